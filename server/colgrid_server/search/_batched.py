"""Exact MaxSim for several queries in one pass over the union of their candidates.

Concurrent searches of one version on a GPU each launch a gather, a matmul and a scatter per
block, and the gather of candidate rows (not the matmul) bounds the kernel (bench/README.md,
GPU path). Run together, the union of their candidates is gathered once, multiplied by all
their query tokens in one matmul, and folded by one scatter-max into (document, query token)
maxima; each query then sums its own columns over its own candidates. The scores are the
float32 MaxSim of each query's candidates, as `maxsim_scores` computes them (up to the float32
rounding of a differently shaped matmul)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from colgrid_server.index import TokenStore
from colgrid_server.search._maxsim import _segment_maxima

# A block's similarities are (block rows x all query tokens): the rows shrink as the batch's
# query tokens grow, so that a batch needs no more scratch than one 32-token query.
REFERENCE_QUERY_TOKENS = 32
MIN_BLOCK_TOKENS = 1024


@dataclass(frozen=True)
class ExactRequest:
    query: torch.Tensor  # (Q, dim) float32
    docs: np.ndarray  # int64 candidate document indices
    k: int


@dataclass(frozen=True)
class ExactResult:
    docs: np.ndarray  # the k best, best first (ties to the lower document index)
    scores: np.ndarray  # their float32 MaxSim


# (query (Q, dim), document indices) -> (len(docs), Q) float32 per-document maxima
MaximaFn = Callable[[torch.Tensor, np.ndarray], torch.Tensor]


def segment_maxima(store: TokenStore, doc_offsets: np.ndarray, block_tokens: int) -> MaximaFn:
    """The segment kernel's maxima, its blocks shrunk as the query tokens grow."""

    def maxima(query: torch.Tensor, docs: np.ndarray) -> torch.Tensor:
        rows = max(MIN_BLOCK_TOKENS, block_tokens * REFERENCE_QUERY_TOKENS // max(1, query.shape[0]))
        return _segment_maxima(query, store, doc_offsets, docs, rows, torch.float32)

    return maxima


def batched_exact_top_k(requests: Sequence[ExactRequest], maxima_of: MaximaFn) -> list[ExactResult]:
    """The k best candidates of every request by float32 MaxSim, in one pass of maxima_of
    (`segment_maxima`, or `PaddedDocuments.maxima`) over the union of their candidates."""
    if not requests:
        return []
    union, inverse = np.unique(np.concatenate([np.asarray(r.docs, dtype=np.int64) for r in requests]), return_inverse=True)
    queries = torch.cat([r.query.to(torch.float32) for r in requests])
    maxima = maxima_of(queries, union)
    results, position, column = [], 0, 0
    for request in requests:
        n_docs, n_q = len(request.docs), request.query.shape[0]
        own = torch.from_numpy(inverse[position : position + n_docs]).to(maxima.device)
        scores = maxima[:, column : column + n_q].index_select(0, own).sum(dim=1).cpu().numpy()
        docs = np.asarray(request.docs, dtype=np.int64)
        order = np.lexsort((docs, -scores))[: request.k]
        results.append(ExactResult(docs=docs[order], scores=scores[order]))
        position, column = position + n_docs, column + n_q
    return results
