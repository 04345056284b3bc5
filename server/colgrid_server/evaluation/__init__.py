"""Evaluation of index versions on judged query sets, and promote gating (DESIGN.md "Registry
and rollouts": evaluation results live on the version in the registry).

    JudgedQuery       a query with graded relevance judgements {doc id: gain}
    read_query_set    JSONL {query_id, query, relevant}; read_beir: queries.jsonl + qrels
    Evaluator         runs a query set on one or two pinned, leased versions; records results
    Evaluation        one version's scores on one query set (nDCG@10, recall@k, MRR@10, latency)
    PromotePolicy     rules a canary must pass to be promoted; gate_promotion raises PromoteRefused

Domain only: nothing here imports grpc or protobuf.
"""
from colgrid_server.evaluation._metrics import (
    DEFAULT_RECALL_K, MRR_CUTOFF, NDCG_CUTOFF, dcg, ndcg_at, percentile, recall_at, reciprocal_rank_at)
from colgrid_server.evaluation._policy import (
    RULES, PolicyFailure, PromotePolicy, PromoteRefused, check_policy, gate_promotion)
from colgrid_server.evaluation._queries import (
    JudgedQuery, check_queries, query_set_name, read_beir, read_qrels, read_query_set)
from colgrid_server.evaluation._results import Evaluation

# The runner searches (torch, onnxruntime); it loads on first use so that reading a query set
# (`colgrid eval` on the client side) stays quick to start.
_RUNNER_NAMES = frozenset({"MAX_VERSIONS", "EvalOptions", "EvaluationStopped", "Evaluator", "run_queries"})


def __getattr__(name: str):
    if name in _RUNNER_NAMES:
        from colgrid_server.evaluation import _runner

        return getattr(_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_RECALL_K",
    "MAX_VERSIONS",
    "MRR_CUTOFF",
    "NDCG_CUTOFF",
    "RULES",
    "EvalOptions",
    "Evaluation",
    "EvaluationStopped",
    "Evaluator",
    "JudgedQuery",
    "PolicyFailure",
    "PromotePolicy",
    "PromoteRefused",
    "check_policy",
    "check_queries",
    "dcg",
    "gate_promotion",
    "ndcg_at",
    "percentile",
    "query_set_name",
    "read_beir",
    "read_qrels",
    "read_query_set",
    "recall_at",
    "reciprocal_rank_at",
    "run_queries",
]
