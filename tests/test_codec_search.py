"""Searching compressed versions: MaxSim is exact for the decoded vectors (float64 reference),
whichever resident layout serves them, and recall@10 stays within a stated tolerance of the
fp16 twin built from the same vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from colgrid_server.index import LoadedVersion, open_version
from colgrid_server.index.testing import SyntheticCorpus, reference_maxsim, write_synthetic_version
from colgrid_server.search import SearchParams, Searcher, maxsim_explain, maxsim_scores

COMPRESSED = ("int8", "residual4", "residual2", "entropy4", "entropy2")

# recall@10 against the fp16 twin's exhaustive top-10, at default search settings, on the corpus
# below (1,000 documents, 30k tokens of dim 64, token-centroid cosine ~0.86 as for MiniLM on real
# text). Measured: fp16 1.000, int8 0.998, residual4 0.963, residual2 0.913, entropy4 0.980,
# entropy2 0.930. On 20k real MiniLM documents (bench/bench_codecs.py, bench/README.md) the
# losses are int8 0.003, residual4 0.026, residual2 0.074 (entropy: see bench/README.md).
MAX_RECALL_LOSS = {"int8": 0.01, "residual4": 0.05, "residual2": 0.12, "entropy4": 0.04, "entropy2": 0.1}


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(64, topics=60, noise=0.3, seed=21)


@pytest.fixture(scope="module")
def documents(corpus):
    return corpus.documents(1000, max_tokens=60)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, corpus, documents) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codec-search")
    for codec in ("fp16", *COMPRESSED):
        write_synthetic_version(root / codec, documents, corpus.encoder, build_params={"codec": codec})
    return {codec: root / codec for codec in ("fp16", *COMPRESSED)}


@pytest.fixture(scope="module")
def queries(corpus) -> list[np.ndarray]:
    return [corpus.vectors(int(n)) for n in np.random.default_rng(3).integers(4, 33, size=60)]


def _tokens(query: np.ndarray) -> list[str]:
    return [f"q{i}" for i in range(query.shape[0])]


def _decoded_documents(version: LoadedVersion) -> list[np.ndarray]:
    """Every document's vectors as the version serves them (float32)."""
    decoded = version.store.decode(0, version.tokens_count).cpu().numpy()
    offsets = version.doc_offsets
    return [decoded[offsets[i] : offsets[i + 1]] for i in range(version.documents)]


@pytest.mark.parametrize("keep_codes", [False, True], ids=["decoded-at-load", "codes-resident"])
@pytest.mark.parametrize("codec", COMPRESSED)
def test_exhaustive_scores_are_exact_for_the_decoded_vectors(paths, queries, codec, keep_codes):
    version = open_version(paths[codec], keep_codes=keep_codes)
    decoded = _decoded_documents(version)
    searcher = Searcher(version)
    for q in queries[:4]:
        reference = reference_maxsim(q, decoded)
        expected = np.lexsort((np.arange(len(decoded)), -reference))[:10]
        hits = searcher.exhaustive(q, _tokens(q), SearchParams()).hits
        assert [h.doc_id for h in hits] == [version.doc_ids[i] for i in expected]
        np.testing.assert_allclose([h.score for h in hits], reference[expected], atol=1e-5)


@pytest.mark.parametrize("codec", COMPRESSED)
def test_kernel_over_resident_codes_matches_the_reference_across_block_boundaries(paths, queries, codec):
    version = open_version(paths[codec], keep_codes=True)
    decoded = _decoded_documents(version)
    pick = np.array([7, 3, 999, 7, 500, 0])
    query = queries[5]
    scores = maxsim_scores(torch.from_numpy(query), version.store, version.doc_offsets, pick, block_tokens=5)
    np.testing.assert_allclose(scores.cpu().numpy(), reference_maxsim(query, [decoded[i] for i in pick]), atol=1e-5)
    explanation = maxsim_explain(torch.from_numpy(query), version.store, version.doc_offsets, pick, block_tokens=5)
    np.testing.assert_allclose(explanation.similarity.sum(dim=1).cpu().numpy(), scores.cpu().numpy(), atol=1e-5)


@pytest.mark.parametrize("codec", COMPRESSED)
def test_bf16_fast_pass_over_resident_codes_returns_the_float32_hits(paths, queries, codec):
    version = open_version(paths[codec], keep_codes=True)
    fast, plain = Searcher(version, fast_pass=True), Searcher(version, fast_pass=False)
    params = SearchParams(n_candidates=1000)
    for q in queries[:20]:
        a, b = fast.search(q, _tokens(q), params).hits, plain.search(q, _tokens(q), params).hits
        assert [h.doc_id for h in a] == [h.doc_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)


@pytest.fixture(scope="module")
def recalls(paths, queries) -> dict[str, float]:
    """recall@10 of each codec's default search against the fp16 twin's exhaustive top-10."""
    fp16 = Searcher(open_version(paths["fp16"]))
    truth = [{h.doc_id for h in fp16.exhaustive(q, _tokens(q), SearchParams()).hits} for q in queries]
    out = {}
    for codec, path in paths.items():
        searcher = Searcher(open_version(path))
        found = [{h.doc_id for h in searcher.search(q, _tokens(q), SearchParams()).hits} for q in queries]
        out[codec] = float(np.mean([len(f & t) / 10 for f, t in zip(found, truth)]))
    return out


@pytest.mark.parametrize("codec", COMPRESSED)
def test_recall_at_10_stays_within_the_stated_loss_of_the_fp16_twin(recalls, codec):
    assert recalls["fp16"] >= 0.95
    loss = recalls["fp16"] - recalls[codec]
    assert loss <= MAX_RECALL_LOSS[codec], f"{codec}: recall@10 {recalls[codec]:.3f} vs fp16 {recalls['fp16']:.3f}"


def test_more_bits_keep_more_recall(recalls):
    assert recalls["int8"] >= recalls["residual4"] >= recalls["residual2"]
    assert recalls["int8"] >= recalls["entropy4"] >= recalls["entropy2"]


def test_entropy_coding_keeps_more_recall_than_fixed_buckets_at_the_same_budget(recalls):
    assert recalls["entropy4"] > recalls["residual4"]
    assert recalls["entropy2"] > recalls["residual2"]
