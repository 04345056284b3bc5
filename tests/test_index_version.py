"""Writing and reading index versions: round trip, derived structures, validation, atomic publish."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from colgrid_server.documents import Document
from colgrid_server.encoders.types import EncodedText
from colgrid_server.errors import FailedPrecondition, InvalidArgument
from colgrid_server.index import (
    MANIFEST_NAME,
    EncoderRef,
    VersionWriter,
    build_version,
    centroid_count,
    open_version,
    version_exists,
)
from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version

DIM = 16
SMALL_BUILD = {"n_centroids": 32}


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(DIM, seed=11)


@pytest.fixture(scope="module")
def documents(corpus):
    return corpus.documents(120)


@pytest.fixture(scope="module")
def version(tmp_path_factory, corpus, documents):
    path = tmp_path_factory.mktemp("versions") / "v1"
    summary = write_synthetic_version(path, documents, corpus.encoder, build_params={**SMALL_BUILD, "note": "x"})
    loaded = open_version(path, device="cpu")
    yield summary, loaded
    loaded.close()


def _tmp_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def test_round_trip_keeps_every_document(version, documents):
    _, loaded = version
    assert loaded.documents == len(documents)
    assert loaded.doc_ids == [d.id for d in documents]
    assert loaded.texts == [d.text for d in documents]
    for i, doc in enumerate(documents):
        lo, hi = loaded.doc_offsets[i], loaded.doc_offsets[i + 1]
        np.testing.assert_array_equal(loaded.tokens[lo:hi].numpy(), doc.vectors.astype(np.float16))
        np.testing.assert_array_equal(loaded.spans[lo:hi], doc.spans)
        assert loaded.metadata(i) == dict(doc.metadata)


def test_tokens_load_as_the_stored_float16_values(version):
    _, loaded = version
    assert loaded.tokens.dtype == torch.float16
    assert loaded.device == torch.device("cpu")


def test_summary_and_attributes_record_encoder_counts_and_build_params(version, corpus, documents):
    summary, loaded = version
    n_tokens = sum(d.vectors.shape[0] for d in documents)
    assert (summary.documents, summary.tokens, summary.centroids, summary.dim) == (len(documents), n_tokens, 32, DIM)
    assert loaded.encoder == corpus.encoder
    assert loaded.name == "v1"
    assert loaded.attrs["counts"]["tokens"] == n_tokens == loaded.tokens_count
    assert loaded.attrs["build_params"]["note"] == "x"
    assert loaded.attrs["build_params"]["n_centroids"] == 32
    assert summary.manifest_sha256 == loaded.manifest_sha256


def test_every_token_is_coded_with_its_nearest_centroid(version):
    _, loaded = version
    sims = loaded.tokens.float().numpy() @ loaded.centroids.T
    chosen = sims[np.arange(sims.shape[0]), loaded.token_codes]
    # bf16 assignment may pick a near-tie; never a clearly worse centroid.
    assert np.all(chosen >= sims.max(axis=1) - 0.02)
    np.testing.assert_allclose(np.linalg.norm(loaded.centroids, axis=1), 1.0, atol=1e-5)


def test_inverted_lists_hold_exactly_the_documents_with_a_token_in_each_centroid(version):
    _, loaded = version
    doc_of_token = np.repeat(np.arange(loaded.documents), np.diff(loaded.doc_offsets))
    for c in range(loaded.centroid_count):
        listed = loaded.ivf_docs[loaded.ivf_offsets[c] : loaded.ivf_offsets[c + 1]]
        expected = np.unique(doc_of_token[loaded.token_codes == c])
        np.testing.assert_array_equal(listed, expected)


def test_centroid_graph_returns_the_nearest_centroids(version, corpus):
    _, loaded = version
    queries = corpus.vectors(50)
    labels, _ = loaded.graph.knn_query(queries, k=4)
    exact = np.argsort(-(queries @ loaded.centroids.T), axis=1)[:, :4]
    overlap = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(labels, exact)])
    assert overlap >= 0.99


@pytest.mark.parametrize(("n_tokens", "expected"), [(1, 1), (100, 8), (10_000, 1024), (271_624, 8192), (6_000_000, 32768)])
def test_centroid_count_follows_plaid_and_stays_small_for_tiny_corpora(n_tokens, expected):
    assert centroid_count(n_tokens) == expected


def test_publish_leaves_only_the_final_directory(tmp_path, corpus):
    summary = write_synthetic_version(tmp_path / "v", corpus.documents(5), corpus.encoder, build_params=SMALL_BUILD)
    assert summary.path == tmp_path / "v"
    assert version_exists(tmp_path / "v")
    assert (tmp_path / "v" / MANIFEST_NAME).is_file()
    assert _tmp_dirs(tmp_path) == []


def test_failure_while_writing_leaves_no_final_and_no_temporary_directory(tmp_path, corpus):
    docs = corpus.documents(3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with VersionWriter(tmp_path / "v", encoder=corpus.encoder) as writer:
            writer.add(docs[0].id, docs[0].vectors, docs[0].spans, docs[0].text)
            assert len(_tmp_dirs(tmp_path)) == 1  # writing happens beside the final name
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_failure_during_finalize_publishes_nothing(tmp_path, corpus):
    with pytest.raises(InvalidArgument, match="at least one document"):
        with VersionWriter(tmp_path / "v", encoder=corpus.encoder) as writer:
            writer.finalize()
    assert list(tmp_path.iterdir()) == []


def test_leaving_the_block_without_finalize_publishes_nothing(tmp_path, corpus):
    doc = corpus.documents(1)[0]
    with VersionWriter(tmp_path / "v", encoder=corpus.encoder) as writer:
        writer.add(doc.id, doc.vectors, doc.spans, doc.text)
    assert list(tmp_path.iterdir()) == []


def test_abort_discards_the_version(tmp_path, corpus):
    doc = corpus.documents(1)[0]
    writer = VersionWriter(tmp_path / "v", encoder=corpus.encoder)
    writer.add(doc.id, doc.vectors, doc.spans, doc.text)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FailedPrecondition):
        writer.add("again", doc.vectors, doc.spans, doc.text)


def test_publishing_over_an_existing_version_is_refused(tmp_path, corpus):
    docs = corpus.documents(3)
    write_synthetic_version(tmp_path / "v", docs, corpus.encoder, build_params=SMALL_BUILD)
    before = (tmp_path / "v" / MANIFEST_NAME).read_bytes()
    with pytest.raises(FailedPrecondition, match="immutable"):
        VersionWriter(tmp_path / "v", encoder=corpus.encoder)
    assert (tmp_path / "v" / MANIFEST_NAME).read_bytes() == before


def test_a_version_published_by_someone_else_meanwhile_is_not_overwritten(tmp_path, corpus):
    doc = corpus.documents(1)[0]
    with VersionWriter(tmp_path / "v", encoder=corpus.encoder) as writer:
        writer.add(doc.id, doc.vectors, doc.spans, doc.text)
        (tmp_path / "v").mkdir()
        with pytest.raises(FailedPrecondition):
            writer.finalize()
    assert [p.name for p in tmp_path.iterdir()] == ["v"]
    assert not version_exists(tmp_path / "v")


def test_tokens_reach_disk_while_documents_stream_in(tmp_path):
    corpus = SyntheticCorpus(256, seed=2)  # 256 dims: a token chunk is 8192 rows
    with VersionWriter(tmp_path / "v", encoder=corpus.encoder) as writer:
        for doc in corpus.documents(400, min_tokens=40, max_tokens=40):
            writer.add(doc.id, doc.vectors, doc.spans, doc.text)
        chunks = sorted(p.name for p in (writer.tmp_dir / "tokens" / "c").iterdir())
        assert len(chunks) == 1  # 16,000 tokens: one whole chunk written, the rest buffered
        writer.abort()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"vectors": np.ones((2, DIM + 1), np.float32)}, "vectors"),
        ({"vectors": np.full((2, DIM), np.nan, np.float32)}, "vectors"),
        ({"vectors": np.full((2, DIM), 1e6, np.float32)}, "vectors"),
        ({"vectors": np.ones((0, DIM), np.float32), "spans": np.ones((0, 2), np.int32)}, "vectors"),
        ({"spans": np.array([[0, 1], [0, 99]], np.int32)}, "spans"),
        ({"spans": np.array([[0, 1]], np.int32)}, "spans"),
        ({"text": ""}, "text"),
        ({"metadata": {"bad": object()}}, "metadata"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"doc_id": ""}, "id"),
    ],
)
def test_invalid_document_is_rejected_naming_the_field(tmp_path, change, field):
    arguments = {
        "doc_id": "d1",
        "vectors": np.ones((2, DIM), np.float32),
        "spans": np.array([[0, 2], [-1, -1]], np.int32),
        "text": "ab cd",
        "metadata": {},
        **change,
    }
    with VersionWriter(tmp_path / "v", encoder=EncoderRef("e", "colbert", DIM)) as writer:
        with pytest.raises(InvalidArgument) as info:
            writer.add(**arguments)
        assert info.value.field == field


def test_duplicate_document_id_is_rejected(tmp_path, corpus):
    doc = corpus.documents(1)[0]
    with VersionWriter(tmp_path / "v", encoder=corpus.encoder) as writer:
        writer.add(doc.id, doc.vectors, doc.spans, doc.text)
        with pytest.raises(InvalidArgument, match="duplicate document id 'doc-0'"):
            writer.add(doc.id, doc.vectors, doc.spans, doc.text)


class _CharEncoder:
    """A real, deterministic encoder for build_version tests: one unit vector per character,
    from the character code, with its span."""

    id, kind, dim = "chars-v1", "colbert", 8

    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode_documents(self, texts: list[str]) -> list[EncodedText]:
        self.batches.append(len(texts))
        out = []
        for text in texts:
            codes = np.array([ord(c) for c in text], dtype=np.float32)
            vectors = np.stack([np.sin(codes * (i + 1)) for i in range(self.dim)], axis=1) + 1e-3
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            spans = np.stack([np.arange(len(text)), np.arange(1, len(text) + 1)], axis=1).astype(np.int32)
            out.append(EncodedText(vectors.astype(np.float32), list(text), spans))
        return out


def test_build_version_encodes_in_batches_and_publishes(tmp_path):
    docs = [Document(f"id{i}", f"text number {i}", {"i": i}) for i in range(10)]
    encoder = _CharEncoder()
    progress: list[int] = []
    summary = build_version(iter(docs), encoder, tmp_path / "v", batch_size=4, on_progress=progress.append)
    assert encoder.batches == [4, 4, 2]
    assert progress == [4, 8, 10]
    loaded = open_version(summary.path)
    assert loaded.doc_ids == [d.id for d in docs]
    assert loaded.encoder == EncoderRef("chars-v1", "colbert", 8)
    assert loaded.attrs["build_params"]["batch_size"] == 4
    assert json.loads(json.dumps(loaded.metadata(3))) == {"i": 3}


def test_build_version_names_the_invalid_document_and_publishes_nothing(tmp_path):
    docs = [Document("good", "fine text"), Document("empty-one", "   ")]
    with pytest.raises(InvalidArgument, match="empty-one"):
        build_version(docs, _CharEncoder(), tmp_path / "v")
    assert list(tmp_path.iterdir()) == []
