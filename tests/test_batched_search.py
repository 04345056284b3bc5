"""Concurrent searches batched into one exact pass (the GPU default; the same code runs here on
CPU): each query gets the top k of float64 MaxSim over its own candidates, as it would alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from colgrid_server.batching import Batcher
from colgrid_server.index import DenseTokens, open_version
from colgrid_server.index.testing import SyntheticCorpus, reference_maxsim, write_synthetic_version
from colgrid_server.search import SearchParams, Searcher
from colgrid_server.search._batched import ExactRequest, batched_exact_top_k, segment_maxima

DIM = 24


def _store(lengths: list[int], seed: int = 0) -> tuple[DenseTokens, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    docs = [rng.standard_normal((n, DIM)).astype(np.float16) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = torch.from_numpy(np.concatenate(docs))
    return DenseTokens(tokens, codec="fp16", max_norm=float("inf")), offsets, [d.astype(np.float32) for d in docs]


def _requests(n_docs: int, seed: int = 1) -> list[ExactRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(7):
        size = int(rng.integers(1, n_docs))
        docs = np.sort(rng.choice(n_docs, size=size, replace=False)) if i % 3 else rng.permutation(n_docs)[:size]
        query = torch.from_numpy(rng.standard_normal((int(rng.integers(1, 40)), DIM)).astype(np.float32))
        out.append(ExactRequest(query=query, docs=docs.astype(np.int64), k=int(rng.integers(1, 15))))
    return out


def _reference_top(request: ExactRequest, docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    scores = reference_maxsim(request.query.numpy(), [docs[d] for d in request.docs])
    order = np.lexsort((request.docs, -scores))[: request.k]
    return request.docs[order], scores[order]


@pytest.mark.parametrize("block_tokens", [64, 8192])
def test_each_batched_query_gets_the_float64_top_k_of_its_own_candidates(block_tokens):
    lengths = list(np.random.default_rng(5).integers(1, 90, size=120))
    store, offsets, docs = _store(lengths)
    requests = _requests(len(lengths))
    results = batched_exact_top_k(requests, segment_maxima(store, offsets, block_tokens))
    assert len(results) == len(requests)
    for request, result in zip(requests, results):
        expected_docs, expected_scores = _reference_top(request, docs)
        np.testing.assert_array_equal(result.docs, expected_docs)
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-5, atol=1e-4)


def test_overlapping_and_identical_candidate_sets_are_scored_per_query():
    store, offsets, docs = _store([5, 9, 3, 12, 7, 1])
    everything = np.arange(6)
    rng = np.random.default_rng(2)
    queries = [torch.from_numpy(rng.standard_normal((n, DIM)).astype(np.float32)) for n in (3, 8, 3)]
    requests = [ExactRequest(q, everything, 6) for q in queries] + [ExactRequest(queries[0], np.array([4, 1]), 6)]
    results = batched_exact_top_k(requests, segment_maxima(store, offsets, 8))
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result.docs, _reference_top(request, docs)[0])
    assert sorted(results[3].docs.tolist()) == [1, 4]  # only its own candidates, never another query's


def test_an_empty_batch_has_no_results():
    store, offsets, _ = _store([3])
    assert batched_exact_top_k([], segment_maxima(store, offsets, 16)) == []


# -- through the Searcher ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(32, topics=30, noise=0.25, seed=9)


@pytest.fixture(scope="module", params=["fp16", "residual4"])
def version(request, tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("batched") / request.param
    write_synthetic_version(path, corpus.documents(400, max_tokens=50), corpus.encoder, build_params={"codec": request.param})
    return open_version(path, keep_codes=request.param != "fp16")


def _queries(corpus: SyntheticCorpus, n: int) -> list[np.ndarray]:
    return [corpus.vectors(int(m)) for m in np.random.default_rng(4).integers(2, 30, size=n)]


def _tokens(query: np.ndarray) -> list[str]:
    return [f"q{i}" for i in range(query.shape[0])]


@pytest.mark.parametrize("padded", [False, True], ids=["segment-kernel", "padded-layout"])
def test_concurrent_batched_searches_answer_as_each_search_alone(version, corpus, padded):
    _check_concurrent_searches(version, corpus, Searcher(version, batch_queries=True, batch_delay=0.05, padded=padded))


def test_concurrent_batched_searches_on_the_fused_kernel_answer_as_each_search_alone(corpus, tmp_path):
    """The fused kernel (the CUDA default) in Triton's interpreter here; float16 versions only."""
    write_synthetic_version(tmp_path / "v", corpus.documents(400, max_tokens=50), corpus.encoder)
    version = open_version(tmp_path / "v")
    batched = Searcher(version, batch_queries=True, batch_delay=0.05, fused=True)
    assert batched.fused is not None and batched.padded is None
    _check_concurrent_searches(version, corpus, batched)


def _check_concurrent_searches(version, corpus: SyntheticCorpus, batched: Searcher) -> None:
    alone = Searcher(version, batch_queries=False, fast_pass=False)
    queries = _queries(corpus, 24)
    params = [SearchParams(k=10), SearchParams(k=3, nprobe=8), SearchParams(k=20, explain=True)]
    barrier = threading.Barrier(8)

    def search(i: int):
        if i < 8:
            barrier.wait()  # eight at once: the leader's delay collects them
        q = queries[i]
        search_fn = batched.exhaustive if i % 5 == 0 else batched.search
        return search_fn(q, _tokens(q), params[i % 3])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(search, range(len(queries))))
    assert batched.batcher is not None and batched.batcher.items == len(queries)
    assert batched.batcher.runs < len(queries)  # some runs served several searches
    for i, (q, got) in enumerate(zip(queries, results)):
        fn = alone.exhaustive if i % 5 == 0 else alone.search
        want = fn(q, _tokens(q), params[i % 3])
        assert [h.doc_id for h in got.hits] == [h.doc_id for h in want.hits]
        np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], rtol=1e-5)
        if params[i % 3].explain:
            assert [[m.doc_token_index for m in h.explanation] for h in got.hits] == [
                [m.doc_token_index for m in h.explanation] for h in want.hits
            ]


def test_batching_is_off_on_cpu_unless_asked(version):
    assert (Searcher(version).batcher is not None) == (version.device.type == "cuda")
    assert Searcher(version, batch_queries=True).batcher is not None


def test_a_failing_search_in_a_batch_fails_alone(version, corpus):
    searcher = Searcher(version, batch_queries=True, batch_delay=0.2)
    good = _queries(corpus, 3)
    wrong_dim = torch.ones((4, 7))  # past the Searcher's own checks: the kernel refuses it
    outcomes: list[object] = [None] * 4

    def run(i: int) -> None:
        try:
            if i == 3:
                outcomes[i] = searcher.batcher.submit(ExactRequest(wrong_dim, np.arange(5), 3))
            else:
                outcomes[i] = searcher.search(good[i], _tokens(good[i]), SearchParams())
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(outcomes[3], ValueError)
    assert all(len(o.hits) == 10 for o in outcomes[:3])


# -- the batcher's queue delay --------------------------------------------------------------------


def test_a_leader_waits_up_to_the_delay_for_companions():
    seen: list[list[int]] = []
    batcher: Batcher[int, int] = Batcher(lambda items: seen.append(list(items)) or [x * 2 for x in items], max_batch=8, max_delay=1.0)

    def late(x: int) -> int:
        time.sleep(0.05 * x)
        return batcher.submit(x)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(late, range(4))) == [0, 2, 4, 6]
    assert seen[0] == [0, 1, 2, 3] and batcher.runs == 1


def test_a_full_batch_runs_without_waiting_out_the_delay():
    batcher: Batcher[int, int] = Batcher(lambda items: list(items), max_batch=1, max_delay=30.0)
    started = time.monotonic()
    assert batcher.submit(5) == 5
    assert time.monotonic() - started < 5.0


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError, match="max_delay"):
        Batcher(lambda items: items, max_batch=2, max_delay=-1.0)


def test_a_leader_with_nothing_on_its_way_runs_at_once():
    batcher: Batcher[int, int] = Batcher(lambda items: list(items), max_batch=8, max_delay=30.0, expect_more=lambda pending: False)
    started = time.monotonic()
    assert batcher.submit(3) == 3
    assert time.monotonic() - started < 5.0


def test_a_lone_batched_search_does_not_wait_out_the_delay(version, corpus):
    searcher = Searcher(version, batch_queries=True, batch_delay=30.0)
    q = corpus.vectors(5)
    started = time.monotonic()
    assert len(searcher.search(q, _tokens(q), SearchParams()).hits) == 10
    assert len(searcher.exhaustive(q, _tokens(q), SearchParams()).hits) == 10
    assert time.monotonic() - started < 10.0
    assert searcher._in_flight == 0


def test_ties_at_the_kth_score_go_to_the_lower_document_indices():
    rng = np.random.default_rng(6)
    same = rng.standard_normal((5, DIM)).astype(np.float16)
    store = DenseTokens(torch.from_numpy(np.concatenate([same] * 60)), codec="fp16", max_norm=float("inf"))
    offsets = np.arange(0, 301, 5, dtype=np.int64)  # 60 identical documents: every score ties
    docs = rng.permutation(60)[:50].astype(np.int64)
    request = ExactRequest(query=torch.from_numpy(rng.standard_normal((4, DIM)).astype(np.float32)), docs=docs, k=3)
    (result,) = batched_exact_top_k([request], segment_maxima(store, offsets, 64))
    np.testing.assert_array_equal(result.docs, np.sort(docs)[:3])
    assert len(set(result.scores.tolist())) == 1
