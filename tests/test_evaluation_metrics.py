"""Relevance metrics against values computed by hand (formulas in colgrid_server.evaluation._metrics)."""
from __future__ import annotations

import math

import pytest

from colgrid_server.evaluation import dcg, ndcg_at, percentile, recall_at, reciprocal_rank_at

GRADED = {"a": 3.0, "b": 2.0, "c": 1.0, "judged-not-relevant": 0.0}
# The ideal order a, b, c: DCG = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.261860 + 0.5 = 4.761860
IDEAL = 3 + 2 / math.log2(3) + 0.5


def test_dcg_discounts_each_gain_by_log2_of_rank_plus_one():
    assert dcg([3, 2, 1]) == pytest.approx(IDEAL)
    assert dcg([0, 0, 4]) == pytest.approx(2.0)  # 4 / log2(4)
    assert dcg([]) == 0.0


def test_ndcg_uses_linear_graded_gains_against_the_ideal_order():
    # c, x, a: 1/log2(2) + 0 + 3/log2(4) = 1 + 1.5 = 2.5
    assert ndcg_at(["c", "x", "a"], GRADED) == pytest.approx(2.5 / IDEAL)
    assert ndcg_at(["c", "x", "a"], GRADED) == pytest.approx(0.5250, abs=1e-4)  # 2.5 / 4.761860


def test_ndcg_of_the_ideal_ranking_is_one_and_ties_do_not_matter():
    assert ndcg_at(["a", "b", "c"], GRADED) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], {"x": 1.0, "y": 1.0, "z": 0.0}) == pytest.approx(1.0)


def test_ndcg_counts_only_the_top_ten_ranks():
    ranking = [f"x{i}" for i in range(10)] + ["a"]
    assert ndcg_at(ranking, GRADED) == 0.0
    assert ndcg_at(ranking, GRADED, n=11) == pytest.approx((3 / math.log2(12)) / IDEAL)


def test_a_relevant_document_never_returned_still_counts_in_the_ideal():
    # Only a is found, at rank 1: 3 / IDEAL, not 1.0 (b and c may be missing from the index).
    assert ndcg_at(["a"], GRADED) == pytest.approx(3 / IDEAL)


def test_judged_non_relevant_documents_count_as_unjudged():
    assert ndcg_at(["judged-not-relevant", "a"], GRADED) == ndcg_at(["unjudged", "a"], GRADED)


def test_recall_is_the_share_of_relevant_documents_in_the_top_k():
    ranking = ["b", "x", "judged-not-relevant", "a", "y", "c"]
    assert recall_at(ranking, GRADED, 4) == pytest.approx(2 / 3)
    assert recall_at(ranking, GRADED, 6) == 1.0
    assert recall_at(ranking, GRADED, 1) == pytest.approx(1 / 3)
    assert recall_at([], GRADED, 10) == 0.0


def test_reciprocal_rank_is_one_over_the_rank_of_the_first_relevant_document():
    assert reciprocal_rank_at(["x", "judged-not-relevant", "c", "a"], GRADED) == pytest.approx(1 / 3)
    assert reciprocal_rank_at(["a"], GRADED) == 1.0
    assert reciprocal_rank_at(["x", "y"], GRADED) == 0.0


def test_reciprocal_rank_ignores_documents_below_rank_ten():
    assert reciprocal_rank_at([f"x{i}" for i in range(10)] + ["a"], GRADED) == 0.0


def test_a_query_without_a_relevant_document_cannot_be_scored():
    with pytest.raises(ValueError, match="undefined"):
        ndcg_at(["a"], {"a": 0.0})
    with pytest.raises(ValueError, match="undefined"):
        recall_at(["a"], {}, 10)


def test_percentiles_interpolate_between_closest_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0
