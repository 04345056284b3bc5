"""The fused centroid-interaction kernel (`FusedCentroidScores`, candidate ranking on a GPU by
default): on CPU it runs in Triton's interpreter, the kernel source a GPU compiles. Scores equal
the float64 centroid interaction for any candidate order, token count across tile edges and
query width; the candidate generator ranks with it as with the torch path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colgrid_server.search._candidates import CandidateGenerator
from colgrid_server.search._fused_centroids import (
    MAX_QUERY_TOKENS,
    FusedCentroidScores,
    fused_centroids_self_check,
)
from tests.searcher_checks import synthetic_version

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LENGTHS = [1, 31, 32, 33, 64, 100, 2, 250]
N_CENTROIDS = 50


def _codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    return rng.integers(0, N_CENTROIDS, size=int(offsets[-1])).astype(np.uint16), offsets


def _reference(table: np.ndarray, codes: np.ndarray, offsets: np.ndarray, docs: np.ndarray) -> np.ndarray:
    t = table.astype(np.float64)
    return np.array([t[codes[offsets[d]:offsets[d + 1]]].max(axis=0).sum() for d in docs])


@pytest.mark.parametrize("n_q", [1, 20, 32, 100])
def test_scores_equal_the_float64_centroid_interaction(n_q):
    codes, offsets = _codes()
    rng = np.random.default_rng(n_q)
    table = rng.standard_normal((N_CENTROIDS, n_q)).astype(np.float32)
    docs = rng.permutation(len(LENGTHS))[:6]
    got = FusedCentroidScores(codes, offsets, DEVICE).scores(torch.from_numpy(table).to(DEVICE), docs).cpu().numpy()
    np.testing.assert_allclose(got, _reference(table, codes, offsets, docs), rtol=1e-5, atol=1e-4)


def test_no_candidates_long_queries_and_mismatched_codes_are_handled():
    codes, offsets = _codes()
    scorer = FusedCentroidScores(codes, offsets, DEVICE)
    assert scorer.scores(torch.ones((N_CENTROIDS, 4), device=DEVICE), np.array([], dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError, match="at most"):
        scorer.scores(torch.ones((N_CENTROIDS, MAX_QUERY_TOKENS + 1), device=DEVICE), np.array([0]))
    with pytest.raises(ValueError, match="token codes"):
        FusedCentroidScores(codes[:-1], offsets, DEVICE)
    assert scorer.nbytes == 4 * codes.shape[0]


def test_the_self_check_passes_on_a_sound_kernel():
    codes, offsets = _codes(1)
    scorer = FusedCentroidScores(codes, offsets, DEVICE)
    assert fused_centroids_self_check(scorer, torch.zeros((N_CENTROIDS, 8)), offsets)


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    return synthetic_version(tmp_path_factory, "fused-centroids", seed=3, documents=200, max_tokens=60)


def test_the_candidate_generator_ranks_by_the_fused_kernel_as_by_the_float64_reference(version):
    loaded, corpus = version
    fused = CandidateGenerator(loaded, fused=True)
    assert fused.fused is not None
    assert (CandidateGenerator(loaded).fused is not None) == (loaded.device.type == "cuda")  # the GPU default
    query = corpus.vectors(12)
    docs = fused.probe(query, nprobe=4)
    got = fused.centroid_scores(query, docs).cpu().numpy()
    table = loaded.centroids.astype(np.float64) @ query.astype(np.float64).T
    np.testing.assert_allclose(got, _reference(table, loaded.token_codes, loaded.doc_offsets, docs), rtol=1e-5, atol=1e-4)
    candidates = fused(query, nprobe=4, n_candidates=10)
    best = docs[np.argsort(-got, kind="stable")[:10]]
    assert set(candidates.tolist()) == set(best.tolist())


@pytest.mark.parametrize("nprobe", [1, 64])
@pytest.mark.parametrize("sort_below", [0, 10**9], ids=["masked", "sorted"])
def test_a_probe_returns_the_sorted_union_of_its_inverted_lists(version, nprobe, sort_below, monkeypatch):
    from colgrid_server.search import _candidates

    monkeypatch.setattr(_candidates, "UNIQUE_BY_SORT_BELOW", sort_below)  # either way of deduplicating
    loaded, corpus = version
    generator = CandidateGenerator(loaded, fused=False)
    query = corpus.vectors(6)
    labels, _ = loaded.graph.knn_query(query, k=min(nprobe, loaded.centroid_count))
    expected = set()
    for c in np.unique(labels).tolist():
        expected.update(loaded.ivf_docs[loaded.ivf_offsets[c]:loaded.ivf_offsets[c + 1]].tolist())
    got = generator.probe(query, nprobe)
    assert got.dtype == np.int64 and np.all(np.diff(got) > 0)
    assert set(got.tolist()) == expected


def test_both_kernels_launched_from_many_threads_at_once_give_the_same_results():
    """Concurrent searches launch them from several threads (on CPU the interpreter, which
    patches triton.language while a kernel runs, must take turns)."""
    import threading

    from colgrid_server.search._fused import FusedMaxima

    codes, offsets = _codes(2)
    rng = np.random.default_rng(9)
    table = torch.from_numpy(rng.standard_normal((N_CENTROIDS, 24)).astype(np.float32)).to(DEVICE)
    tokens = torch.from_numpy(rng.standard_normal((int(offsets[-1]), 32)).astype(np.float16)).to(DEVICE)
    query = torch.from_numpy(rng.standard_normal((24, 32)).astype(np.float32))
    docs = np.arange(len(LENGTHS))
    scorer, layout = FusedCentroidScores(codes, offsets, DEVICE), FusedMaxima(tokens, offsets)
    want_scores, want_maxima = scorer.scores(table, docs).cpu(), layout.maxima(query, docs).cpu()
    barrier, failures = threading.Barrier(8), []

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            try:
                if i % 2:
                    assert torch.equal(scorer.scores(table, docs).cpu(), want_scores)
                else:
                    assert torch.equal(layout.maxima(query, docs).cpu(), want_maxima)
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
