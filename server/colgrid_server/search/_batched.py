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
    (`segment_maxima`, `PaddedDocuments.maxima` or `FusedMaxima.maxima`) over the union of their
    candidates."""
    if not requests:
        return []
    docs = [np.asarray(r.docs, dtype=np.int64) for r in requests]
    union, inverses = _union(docs)
    queries = torch.cat([r.query.to(torch.float32) for r in requests])
    maxima = maxima_of(queries, union)
    results, column = [], 0
    for request, own_docs, inverse in zip(requests, docs, inverses):
        n_q = request.query.shape[0]
        mine = maxima[:, column : column + n_q]
        if inverse is not None:
            mine = mine.index_select(0, torch.from_numpy(inverse).to(maxima.device))
        kept, scores = _best(mine.sum(dim=1), request.k)
        kept_docs = own_docs[kept]
        order = np.lexsort((kept_docs, -scores))[: request.k]
        results.append(ExactResult(docs=kept_docs[order], scores=scores[order]))
        column += n_q
    return results


def _union(docs: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The documents to score once, and where each request's documents sit among them (None:
    in the same order). Concurrent exhaustive searches all ask for every document: no work."""
    first = docs[0]
    if all(d is first or np.array_equal(d, first) for d in docs[1:]):
        return first, [None] * len(docs)
    # A mask over document indices, not np.unique's sort: linear in the candidates.
    size = max((int(d.max()) + 1 for d in docs if d.size), default=0)
    mask = np.zeros(size, dtype=bool)
    for d in docs:
        mask[d] = True
    position = np.cumsum(mask) - 1
    return np.flatnonzero(mask), [position[d] for d in docs]


def _best(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and float32 scores of every candidate scoring at least the k-th best (ties at
    the boundary included, so that the caller's tie-break by document index stays exact);
    selected on the scores' device so that only ~k of them travel to the host."""
    if scores.shape[0] <= 4 * k:
        values = scores.cpu().numpy()
        return np.arange(values.shape[0]), values
    kth = torch.topk(scores, k, sorted=False).values.min()
    kept = torch.nonzero(scores >= kth).squeeze(1)
    return kept.cpu().numpy(), scores.index_select(0, kept).cpu().numpy()
