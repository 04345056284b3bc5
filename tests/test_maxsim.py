"""Exact MaxSim kernel against the float64 one-document-at-a-time definition."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colgrid_server.index.testing import reference_maxsim
from colgrid_server.search import bf16_error_bound, maxsim_explain, maxsim_scores

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
