"""Exact MaxSim kernel against the float64 one-document-at-a-time definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colgrid_server.index.testing import reference_maxsim
from colgrid_server.search import bf16_error_bound, maxsim_explain, maxsim_scores
from colgrid_server.search._maxsim import int8_screen_scores, screened_exact_scores
from colgrid_server.search._searcher import exact_top_k

DIM = 24


def _corpus(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, np.ndarray, list[np.ndarray]]:
    """fp16 token table (the stored layout), CSR offsets, and each document's stored vectors."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((sum(lengths), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stored = vectors.astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    docs = [stored[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
    return torch.from_numpy(stored), offsets, docs


def _query(n: int, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


LENGTHS = [1, 7, 1, 30, 2, 64, 1, 5, 13, 3]  # one-token documents and a 64-token one


def test_scores_match_float64_reference():
    tokens, offsets, docs = _corpus(LENGTHS)
    query = _query(9)
    scores = maxsim_scores(torch.from_numpy(query), tokens, offsets, np.arange(len(LENGTHS)))
    assert scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), reference_maxsim(query, docs), rtol=0, atol=1e-5)


def test_query_longer_than_every_document():
    tokens, offsets, docs = _corpus([1, 2, 3])
    query = _query(32)
    scores = maxsim_scores(torch.from_numpy(query), tokens, offsets, np.arange(3))
    np.testing.assert_allclose(scores.numpy(), reference_maxsim(query, docs), atol=1e-5)


@pytest.mark.parametrize("block_tokens", [1, 3, 16])
def test_blocks_smaller_than_one_document_give_the_same_scores(block_tokens):
    tokens, offsets, docs = _corpus(LENGTHS)
    query = _query(5)
    scores = maxsim_scores(torch.from_numpy(query), tokens, offsets, np.arange(len(LENGTHS)), block_tokens=block_tokens)
    np.testing.assert_allclose(scores.numpy(), reference_maxsim(query, docs), atol=1e-5)


def test_subset_in_any_order_scores_each_requested_document():
    tokens, offsets, docs = _corpus(LENGTHS)
    query = _query(6)
    pick = np.array([5, 0, 9, 5, 3])  # unsorted, with a repeat
    scores = maxsim_scores(torch.from_numpy(query), tokens, torch.from_numpy(offsets), pick, block_tokens=10)
    np.testing.assert_allclose(scores.numpy(), reference_maxsim(query, [docs[i] for i in pick]), atol=1e-5)


def test_no_documents_gives_no_scores():
    tokens, offsets, _ = _corpus(LENGTHS)
    scores = maxsim_scores(torch.from_numpy(_query(4)), tokens, offsets, np.array([], dtype=np.int64))
    assert scores.shape == (0,)


def test_document_index_outside_offsets_is_rejected():
    tokens, offsets, _ = _corpus([2, 2])
    with pytest.raises(IndexError):
        maxsim_scores(torch.from_numpy(_query(2)), tokens, offsets, np.array([2]))


def test_bf16_pass_stays_within_its_error_bound():
    lengths = list(np.random.default_rng(3).integers(1, 80, size=300))
    tokens, offsets, docs = _corpus(lengths, seed=3)
    query = torch.from_numpy(_query(32, seed=4))
    fast = maxsim_scores(query, tokens, offsets, np.arange(len(lengths)), compute_dtype=torch.bfloat16)
    exact = maxsim_scores(query, tokens, offsets, np.arange(len(lengths)))
    bound = bf16_error_bound(query, max_token_norm=float(tokens.float().norm(dim=1).max()))
    error = (fast - exact).abs().max().item()
    assert 0 < error <= bound


def test_explanation_points_at_each_query_tokens_best_document_token():
    tokens, offsets, docs = _corpus(LENGTHS)
    query = _query(8)
    pick = np.array([3, 0, 5])
    explanation = maxsim_explain(torch.from_numpy(query), tokens, offsets, pick, block_tokens=7)
    for row, doc in enumerate(pick):
        sims = query.astype(np.float64) @ docs[doc].astype(np.float64).T
        np.testing.assert_array_equal(explanation.token_index[row].numpy(), sims.argmax(axis=1))
        np.testing.assert_allclose(explanation.similarity[row].numpy(), sims.max(axis=1), atol=1e-6)


def test_explanation_similarities_sum_to_the_score():
    tokens, offsets, _ = _corpus(LENGTHS)
    query = torch.from_numpy(_query(8))
    pick = np.arange(len(LENGTHS))
    explanation = maxsim_explain(query, tokens, offsets, pick, block_tokens=5)
    scores = maxsim_scores(query, tokens, offsets, pick)
    np.testing.assert_allclose(explanation.similarity.sum(dim=1).numpy(), scores.numpy(), atol=1e-5)


def test_explanation_ties_go_to_the_first_matching_token():
    vectors = np.tile(_query(1, seed=9), (4, 1)).astype(np.float16)  # four identical tokens
    tokens, offsets = torch.from_numpy(vectors), np.array([0, 4])
    explanation = maxsim_explain(torch.from_numpy(_query(3)), tokens, offsets, np.array([0]), block_tokens=2)
    assert explanation.token_index.tolist() == [[0, 0, 0]]


def test_query_of_another_dimension_is_rejected():
    tokens, offsets, _ = _corpus([2, 2])
    with pytest.raises(ValueError, match="does not match"):
        maxsim_explain(torch.ones(2, DIM + 1), tokens, offsets, np.array([0]))


def test_block_shapes_come_from_a_bounded_set_whatever_the_candidates():
    # oneDNN caches one compiled kernel per matmul shape: free block sizes grew memory forever.
    from colgrid_server.search._maxsim import ROW_QUANTUM, _Layout

    lengths = list(np.random.default_rng(5).integers(1, 50, size=200))
    _, offsets, _ = _corpus(lengths)
    for pick in (np.arange(200), np.array([3]), np.arange(0, 200, 7)):
        rows = [block.rows.shape[0] for block in _Layout(offsets, pick, torch.device("cpu")).blocks(1000)]
        assert all(n % ROW_QUANTUM == 0 for n in rows)


# The int8 screen: an approximate pass with a proven per-document bound, then float32 on the
# tokens that can hold a maximum. Checked against float64 the same way as the exact kernel.

SCREEN_LENGTHS = [1, 7, 1, 300, 2, 64, 1, 5, 13, 3, 40, 1, 90, 2]  # one-token docs and a 300-token one


def _screened(lengths: list[int], seed: int = 0, dim: int = DIM):
    from colgrid_server.index import DenseTokens

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((sum(lengths), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stored = torch.from_numpy(vectors.astype(np.float16))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    store = DenseTokens(stored, codec="fp16", max_norm=float(stored.float().norm(dim=1).max())).with_screen(offsets)
    docs = [stored[offsets[i] : offsets[i + 1]].numpy() for i in range(len(lengths))]
    return store, offsets, docs


def test_screen_codes_and_scales_rebuild_each_token_within_its_documents_recorded_error():
    store, offsets, docs = _screened(SCREEN_LENGTHS)
    screen = store.screen
    assert screen.codes.dtype == torch.int8 and screen.codes.abs().max() <= 127
    rebuilt = screen.codes.numpy().astype(np.float64) * screen.scale
    for d, stored in enumerate(docs):
        error = np.linalg.norm(stored.astype(np.float64) - rebuilt[offsets[d] : offsets[d + 1]], axis=1)
        codes = np.linalg.norm(screen.codes[offsets[d] : offsets[d + 1]].numpy().astype(np.float64), axis=1)
        assert error.max() <= screen.doc_error[d] and codes.max() <= screen.doc_code_norm[d]


def test_screen_of_an_all_zero_dimension_scores_like_the_others():
    vectors = _query(40, seed=2)
    vectors[:, 3] = 0.0
    from colgrid_server.index import DenseTokens

    stored = torch.from_numpy(vectors.astype(np.float16))
    offsets = np.array([0, 10, 40])
    store = DenseTokens(stored, codec="fp16", max_norm=1.001).with_screen(offsets)
    assert np.isfinite(store.screen.scale).all() and (store.screen.scale > 0).all()
    top = exact_top_k(torch.from_numpy(_query(4)), store, offsets, np.arange(2), 1, fast_pass=True)
    assert top.docs.tolist() == [int(np.argmax(reference_maxsim(_query(4), [stored[:10].numpy(), stored[10:].numpy()])))]


@pytest.mark.parametrize("block_tokens", [16, 100, 8192])
def test_int8_screen_scores_stay_within_their_per_document_bound(block_tokens):
    store, offsets, _ = _screened(SCREEN_LENGTHS)
    pick = np.array([3, 0, 12, 3, 7, 1, 13])  # unsorted, a repeat, spanning blocks
    for n_q in (1, 9, 40):  # 40 query tokens: longer than most documents
        query = torch.from_numpy(_query(n_q, seed=n_q))
        screened = int8_screen_scores(query, store.screen, offsets, pick, max_token_norm=store.max_norm, block_tokens=block_tokens)
        exact = maxsim_scores(query, store, offsets, pick).numpy()
        assert np.all(np.abs(screened.scores - exact) <= screened.error)
        assert np.all(screened.error > 0)


@pytest.mark.parametrize("block_tokens", [16, 100, 8192])
def test_screened_exact_scores_equal_the_float64_reference(block_tokens):
    store, offsets, docs = _screened(SCREEN_LENGTHS)
    pick = np.array([3, 0, 12, 3, 7, 1, 13, 11])
    for n_q in (1, 9, 40):
        query = torch.from_numpy(_query(n_q, seed=10 + n_q))
        screened = int8_screen_scores(query, store.screen, offsets, pick, max_token_norm=store.max_norm, block_tokens=block_tokens)
        keep = np.array([0, 2, 3, 5, 7])
        scores = screened_exact_scores(query, store, offsets, pick, screened, keep, block_tokens=block_tokens)
        assert scores.dtype == torch.float32
        np.testing.assert_allclose(scores.numpy(), reference_maxsim(query.numpy(), [docs[i] for i in pick[keep]]), atol=1e-5)


def test_screened_top_k_ranks_as_the_float64_reference_does():
    lengths = list(np.random.default_rng(7).integers(1, 120, size=400))
    store, offsets, docs = _screened(lengths, seed=7)
    rng = np.random.default_rng(8)
    for _ in range(10):
        pick = np.sort(rng.choice(400, size=250, replace=False))
        # A query made of a document's own tokens, with noise: a few documents stand out.
        source = docs[int(rng.choice(pick))].astype(np.float32)
        query = source[rng.integers(0, source.shape[0], size=16)] + 0.3 * rng.standard_normal((16, DIM)).astype(np.float32)
        query /= np.linalg.norm(query, axis=1, keepdims=True)
        top = exact_top_k(torch.from_numpy(query), store, offsets, pick, 10, fast_pass=True, block_tokens=1000)
        reference = reference_maxsim(query, [docs[i] for i in pick])
        expected = np.lexsort((pick, -reference))[:10]
        assert top.docs.tolist() == pick[expected].tolist()
        np.testing.assert_allclose(top.scores, reference[expected], atol=1e-5)
        assert 10 <= top.rescored < 250


def test_screened_top_k_breaks_ties_by_lower_document_index():
    from colgrid_server.index import DenseTokens

    one = _query(5, seed=3).astype(np.float16)
    stored = torch.from_numpy(np.concatenate([one, _query(5, seed=4).astype(np.float16), one]))  # docs 0 and 2 equal
    offsets = np.array([0, 5, 10, 15])
    store = DenseTokens(stored, codec="fp16", max_norm=1.001).with_screen(offsets)
    top = exact_top_k(torch.from_numpy(_query(3, seed=5)), store, offsets, np.array([2, 1, 0]), 2, fast_pass=True)
    scores = reference_maxsim(_query(3, seed=5), [one, stored[5:10].numpy()])
    expected = [0, 2] if scores[0] > scores[1] else [1, 0]
    assert top.docs.tolist() == expected


def test_aligned_layout_runs_belong_to_one_document_and_repeat_only_its_last_token():
    from colgrid_server.search._maxsim import SCREEN_ALIGN, _Layout

    lengths = [1, 17, 16, 33, 2, 250]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pick = np.array([5, 0, 3, 1, 4, 2])
    for block_tokens in (16, 64, 8192):
        for block in _Layout(offsets, pick, torch.device("cpu"), align=SCREEN_ALIGN).blocks(block_tokens):
            runs = block.segments.view(-1, SCREEN_ALIGN)
            assert bool((runs == runs[:, :1]).all())
            doc = pick[block.segments.numpy()]
            assert np.all((block.rows.numpy() >= offsets[doc]) & (block.rows.numpy() < offsets[doc + 1]))


def test_version_opened_with_a_screen_searches_to_the_same_hits(tmp_path):
    from colgrid_server.index import open_version
    from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version
    from colgrid_server.search import SearchParams, Searcher

    corpus = SyntheticCorpus(DIM, topics=20, seed=4)
    write_synthetic_version(tmp_path / "v", corpus.documents(400, max_tokens=60), corpus.encoder)
    screened, plain = open_version(tmp_path / "v", device="cpu", screen=True), open_version(tmp_path / "v", device="cpu")
    assert screened.store.screen is not None and plain.store.screen is None
    assert screened.nbytes > plain.nbytes
    params = SearchParams(k=10, n_candidates=300)
    for n in (4, 32):
        q = corpus.vectors(n)
        tokens = [f"q{i}" for i in range(n)]
        a = Searcher(screened, fast_pass=True).search(q, tokens, params).hits
        b = Searcher(plain, fast_pass=False).search(q, tokens, params).hits
        assert [h.doc_id for h in a] == [h.doc_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)


def test_int8_passes_split_across_threads_give_the_same_results_and_keep_the_thread_count():
    store, offsets, _ = _screened(SCREEN_LENGTHS * 8)
    pick = np.arange(len(SCREEN_LENGTHS) * 8)[::-1]
    query = torch.from_numpy(_query(12, seed=30))
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            screened = int8_screen_scores(query, store.screen, offsets, pick, max_token_norm=store.max_norm, block_tokens=64)
            exact = screened_exact_scores(query, store, offsets, pick, screened, np.arange(pick.shape[0]), block_tokens=64)
            runs[threads] = (screened.scores, exact.numpy())
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(runs[1][0], runs[4][0])
    np.testing.assert_allclose(runs[1][1], runs[4][1], rtol=1e-6)
