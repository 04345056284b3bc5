"""Bring your own vectors: versions built from a precomputed token matrix, CSR offsets and ids."""
from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from colgrid_server.errors import InvalidArgument
from colgrid_server.index import (
    EncoderRef,
    build_version_from_arrays,
    external_encoder_ref,
    external_version_writer,
    is_external,
    open_version,
    version_exists,
)
from colgrid_server.index.testing import SyntheticCorpus, reference_maxsim
from colgrid_server.search import SearchParams, Searcher

DIM = 16
SMALL = {"n_centroids": 16}


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(DIM, seed=31)


@pytest.fixture(scope="module")
def arrays(corpus):
    """tokens (float32), offsets and ids of 80 documents."""
    docs = corpus.documents(80, max_tokens=20)
    tokens = np.concatenate([d.vectors for d in docs])
    offsets = np.concatenate([[0], np.cumsum([d.vectors.shape[0] for d in docs])]).astype(np.int64)
    return tokens, offsets, [f"ext-{i}" for i in range(len(docs))]


@pytest.fixture(scope="module")
def version(tmp_path_factory, arrays):
    tokens, offsets, ids = arrays
    path = tmp_path_factory.mktemp("byo") / "v1"
    metadata = [{"n": i} for i in range(len(ids))]
    summary = build_version_from_arrays(
        path, tokens=tokens, doc_offsets=offsets, doc_ids=ids, metadata=metadata, normalized=True, build_params=SMALL
    )
    loaded = open_version(path)
    yield summary, loaded
    loaded.close()


def _build(path: Path, tokens, offsets, ids, **kwargs):
    kwargs.setdefault("normalized", True)
    kwargs.setdefault("build_params", SMALL)
    return build_version_from_arrays(path, tokens=tokens, doc_offsets=offsets, doc_ids=ids, **kwargs)


def test_round_trip_keeps_vectors_ids_and_metadata(version, arrays):
    summary, loaded = version
    tokens, offsets, ids = arrays
    assert (summary.documents, summary.tokens, summary.dim) == (len(ids), tokens.shape[0], DIM)
    assert loaded.doc_ids == ids
    np.testing.assert_array_equal(loaded.doc_offsets, offsets)
    np.testing.assert_array_equal(loaded.tokens.cpu().numpy(), tokens.astype(np.float16))
    assert loaded.metadata(7) == {"n": 7}


def test_version_has_no_token_spans_and_no_text_unless_given(version, arrays):
    _, loaded = version
    assert loaded.texts == [""] * len(arrays[2])
    assert loaded.spans.shape == (arrays[0].shape[0], 2) and (loaded.spans == -1).all()
    assert loaded.attrs["token_spans"] is False


def test_texts_are_stored_when_given(tmp_path, arrays):
    tokens, offsets, ids = arrays
    texts = [f"text of {i}" for i in range(len(ids))]
    loaded = open_version(_build(tmp_path / "v", tokens, offsets, ids, texts=texts).path)
    assert loaded.texts == texts


def test_version_records_an_external_encoder_with_its_dim_and_normalisation(version):
    _, loaded = version
    assert loaded.encoder.kind == "external" and loaded.encoder.dim == DIM
    assert re.fullmatch(r"external:[0-9a-f]{64}", loaded.encoder.id)
    assert loaded.encoder == external_encoder_ref(DIM, normalized=True)
    assert loaded.normalized is True
    assert loaded.attrs["vectors"] == {"source": "external", "normalization": "l2"}


def test_external_encoder_id_depends_on_dim_and_normalisation_only():
    assert external_encoder_ref(16, True) == external_encoder_ref(16, True)
    ids = {external_encoder_ref(d, n).id for d in (16, 32) for n in (True, False)}
    assert len(ids) == 4


def test_is_external_tells_external_versions_from_encoder_built_ones(version):
    _, loaded = version
    assert is_external(loaded.encoder)
    assert not is_external(EncoderRef("4a638a5de297", "colbert", 384))


def test_summary_names_the_external_encoder_and_codec(version):
    summary, _ = version
    assert summary.encoder == external_encoder_ref(DIM, normalized=True)
    assert summary.codec == "fp16"


def test_documents_streamed_one_by_one_make_the_same_kind_of_version(tmp_path, arrays):
    tokens, offsets, ids = arrays
    with external_version_writer(tmp_path / "v", dim=DIM, normalized=True, build_params=SMALL) as writer:
        for i, doc_id in enumerate(ids):
            writer.add(doc_id, tokens[offsets[i] : offsets[i + 1]], metadata={"n": i})
        writer.finalize()
    loaded = open_version(tmp_path / "v")
    assert loaded.encoder == external_encoder_ref(DIM, normalized=True)
    assert loaded.attrs["vectors"] == {"source": "external", "normalization": "l2"}
    assert loaded.texts == [""] * len(ids) and loaded.attrs["token_spans"] is False
    np.testing.assert_array_equal(loaded.tokens.cpu().numpy(), tokens.astype(np.float16))


def test_unnormalized_vectors_are_kept_as_given(tmp_path, arrays):
    tokens, offsets, ids = arrays
    loaded = open_version(_build(tmp_path / "v", tokens * 3.0, offsets, ids, normalized=False).path)
    np.testing.assert_allclose(np.linalg.norm(loaded.tokens.float().cpu().numpy(), axis=1), 3.0, rtol=2e-3)
    assert loaded.normalized is False
    assert loaded.encoder == external_encoder_ref(DIM, normalized=False)


def test_search_with_query_vectors_is_exact_and_finds_the_source_document(version, arrays, corpus):
    _, loaded = version
    tokens, offsets, ids = arrays
    target = 23
    query = tokens[offsets[target] : offsets[target + 1]][:6]
    hits = Searcher(loaded).search(query, [f"q{i}" for i in range(len(query))], SearchParams(k=5, explain=True)).hits
    assert hits[0].doc_id == ids[target]
    stored = [tokens[offsets[i] : offsets[i + 1]].astype(np.float16) for i in range(len(ids))]
    reference = reference_maxsim(query, [stored[ids.index(h.doc_id)] for h in hits])
    np.testing.assert_allclose([h.score for h in hits], reference, atol=1e-5)
    assert all(m.doc_token == "" and (m.start, m.end) == (-1, -1) for m in hits[0].explanation)


def test_memory_mapped_tokens_are_streamed_not_loaded_whole(tmp_path):
    n, dim = 200_000, 64  # 51 MB of float32 on disk
    rng = np.random.default_rng(0)
    mapped = np.lib.format.open_memmap(tmp_path / "tokens.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 50_000):
        block = rng.standard_normal((50_000, dim)).astype(np.float32)
        mapped[start : start + 50_000] = block / np.linalg.norm(block, axis=1, keepdims=True)
    mapped.flush()
    del mapped
    tokens = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    offsets = np.arange(0, n + 1, 50, dtype=np.int64)
    ids = [f"d{i}" for i in range(n // 50)]
    tracemalloc.start()
    try:
        _build(tmp_path / "v", tokens, offsets, ids, build_params={"n_centroids": 64})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < tokens.nbytes / 2, f"peak {peak / 2**20:.1f} MB for {tokens.nbytes / 2**20:.1f} MB of tokens"
    assert version_exists(tmp_path / "v")


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda t, o, i: {"tokens": t[:, 0]}, "tokens", "2-D"),
        (lambda t, o, i: {"tokens": (t * 100).astype(np.int32)}, "tokens", "floating point"),
        (lambda t, o, i: {"tokens": np.where(np.arange(len(t))[:, None] == o[40], np.nan, t)}, "tokens", "'ext-40'"),
        (lambda t, o, i: {"tokens": t * 1e6}, "tokens", "float16 range"),
        (lambda t, o, i: {"doc_offsets": o[::-1].copy()}, "doc_offsets", "start at 0"),
        (lambda t, o, i: {"doc_offsets": np.concatenate([o[:5], o[4:]])}, "doc_offsets", "increase strictly"),
        (lambda t, o, i: {"doc_offsets": np.concatenate([o[:5], [o[3]], o[6:]])}, "doc_offsets", "document 4"),
        (lambda t, o, i: {"doc_offsets": o[:-1]}, "doc_offsets", "end at"),
        (lambda t, o, i: {"doc_offsets": o.astype(np.float64)}, "doc_offsets", "integer"),
        (lambda t, o, i: {"doc_ids": i[:-1]}, "doc_ids", "79 doc_ids for 80 documents"),
        (lambda t, o, i: {"doc_ids": i[:10] + ["ext-3"] + i[11:]}, "doc_ids", "duplicate document id 'ext-3'"),
        (lambda t, o, i: {"doc_ids": [""] + i[1:]}, "doc_ids", "non-empty"),
        (lambda t, o, i: {"texts": ["x"] * 3}, "texts", "3 texts for 80 documents"),
        (lambda t, o, i: {"metadata": [{}] * 79}, "metadata", "79 metadata"),
        (lambda t, o, i: {"metadata": [{}] * 50 + [["not", "an", "object"]] + [{}] * 29}, "metadata", "'ext-50'"),
        (lambda t, o, i: {"tokens": t * 2.0}, "normalized", "declared normalized"),
        (lambda t, o, i: {"normalized": "yes"}, "normalized", "true or false"),
        (lambda t, o, i: {"build_params": {"codec": "zip"}}, "build_params.codec", "fp16, int8, residual4, residual2"),
    ],
)
def test_invalid_input_is_rejected_naming_the_field_and_publishes_nothing(tmp_path, arrays, change, field, message):
    tokens, offsets, ids = arrays
    arguments = {"tokens": tokens, "doc_offsets": offsets, "doc_ids": ids, "normalized": True, **change(tokens, offsets, ids)}
    with pytest.raises(InvalidArgument) as info:
        build_version_from_arrays(tmp_path / "v", **arguments)
    assert info.value.field == field
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_error_late_in_the_stream_publishes_nothing(tmp_path):
    n, dim = 40_000, 32  # several read blocks
    tokens = np.ones((n, dim), dtype=np.float32) / np.sqrt(dim)
    tokens[n - 3, 5] = np.inf
    offsets = np.arange(0, n + 1, 40, dtype=np.int64)
    with pytest.raises(InvalidArgument, match="'d999'"):
        _build(tmp_path / "v", tokens, offsets, [f"d{i}" for i in range(n // 40)])
    assert list(tmp_path.iterdir()) == []
