"""Relevance metrics of one ranking against one query's judgements, and their means.

With `ranking` the returned document ids in rank order (rank 1 first, ids distinct) and
rel(d) the judged gain of d (0 when unjudged), R = {d : rel(d) > 0}:

    DCG@n    = sum_{i=1..min(n, |ranking|)} rel(ranking_i) / log2(i + 1)
    nDCG@n   = DCG@n / IDCG@n, IDCG@n = DCG@n of the judged gains sorted descending
               (linear gains and the whole judged set as ideal: trec_eval's ndcg_cut, as
               BEIR reports it, so a relevant document missing from the index still counts)
    recall@k = |R ∩ ranking[:k]| / |R|
    RR@n     = 1 / (rank of the first d in R within the top n), 0 when none is
    MRR@n    = mean of RR@n over the queries

Every per-query metric is a mean over queries with equal weight (macro average). Latency
percentiles interpolate linearly between closest ranks (numpy's default), like ShadowStats.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

NDCG_CUTOFF = 10
MRR_CUTOFF = 10
DEFAULT_RECALL_K = 100


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain of gains in rank order (rank 1 first)."""
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


def ndcg_at(ranking: Sequence[str], relevance: Mapping[str, float], n: int = NDCG_CUTOFF) -> float:
    ideal = dcg(sorted((g for g in relevance.values() if g > 0), reverse=True)[:n])
    if ideal == 0:
        raise ValueError("nDCG is undefined for a query without a relevant document")
    return dcg([max(relevance.get(doc, 0.0), 0.0) for doc in ranking[:n]]) / ideal


def recall_at(ranking: Sequence[str], relevance: Mapping[str, float], k: int) -> float:
    relevant = {doc for doc, g in relevance.items() if g > 0}
    if not relevant:
        raise ValueError("recall is undefined for a query without a relevant document")
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def reciprocal_rank_at(ranking: Sequence[str], relevance: Mapping[str, float], n: int = MRR_CUTOFF) -> float:
    for rank, doc in enumerate(ranking[:n], start=1):
        if relevance.get(doc, 0.0) > 0:
            return 1.0 / rank
    return 0.0


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0
