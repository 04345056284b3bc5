"""Exact MaxSim over a subset of documents, segment-wise: the candidates' token ranges are
gathered (and decoded, for a compressed store) a bounded block at a time, one matmul per block,
and a scatter 'amax' folds each block's similarities into per-(document, query token) maxima.
No Python loop per document; a document may span several blocks.

Tokens are a float16 tensor (the stored values) or any `TokenStore`; scores are exact for the
float32 vectors the store decodes to."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from colgrid_server.index import DenseTokens, TokenStore

Tokens = torch.Tensor | TokenStore

DEFAULT_BLOCK_TOKENS = 8192  # (8192 x dim) floats per block: cache-sized on CPU, small on GPU
QUERY_PAD = 16
# Block rows are padded to a multiple of this (repeating the last row: a repeat changes no
# maximum). oneDNN compiles and caches a kernel per matmul shape, ~0.6 MB each: with the last
# block's size free, a long-running server kept growing; with it bounded, at most
# DEFAULT_BLOCK_TOKENS / ROW_QUANTUM shapes per query width.
ROW_QUANTUM = 256
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24


def maxsim_scores(
    query: torch.Tensor,
    tokens: Tokens,
    doc_offsets: np.ndarray | torch.Tensor,
    doc_indices: np.ndarray,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """score[i] = sum_q max_{t in doc doc_indices[i]} <query[q], t>, float32 (len(doc_indices),).

    compute_dtype=float32 (default) is exact up to float32 rounding for the stored vectors.
    bfloat16 is the fast approximate pass on CPUs with bf16 units; its error is bounded by
    `bf16_error_bound`.
    """
    return _segment_maxima(query, tokens, doc_offsets, doc_indices, block_tokens, compute_dtype).sum(dim=1)


@dataclass(frozen=True)
class Explanation:
    """Per (document, query token): the best document token (index within the document) and
    its similarity. similarity.sum(dim=1) is the document's score."""

    token_index: torch.Tensor  # int64 (n_docs, Q)
    similarity: torch.Tensor  # float32 (n_docs, Q)


def maxsim_explain(
    query: torch.Tensor,
    tokens: Tokens,
    doc_offsets: np.ndarray | torch.Tensor,
    doc_indices: np.ndarray,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> Explanation:
    """The argmax document token per query token, exact (float32). Ties go to the first token.
    One pass: each block's maxima and first argmax are merged into the running ones, comparing
    only values of the same matmul (never recomputed ones)."""
    store = _store(tokens)
    _check_shapes(query, store, block_tokens)
    layout = _Layout(doc_offsets, doc_indices, store.device)
    q_t = _query_t(query, store.device, torch.float32)
    shape = (layout.n_docs, query.shape[0])
    never = torch.iinfo(torch.int64).max
    best = torch.full(shape, -torch.inf, dtype=torch.float32, device=store.device)
    first = torch.full(shape, never, dtype=torch.int64, device=store.device)
    for block in layout.blocks(block_tokens):
        sims = _block_sims(store, block, q_t, shape[1])
        seg = block.segments[:, None].expand_as(sims)
        block_best = torch.full_like(best, -torch.inf).scatter_reduce_(0, seg, sims, "amax", include_self=True)
        position = torch.where(sims == block_best.gather(0, seg), block.within_doc[:, None].expand_as(sims), never)
        block_first = torch.full_like(first, never).scatter_reduce_(0, seg, position, "amin", include_self=True)
        better = block_best > best  # strict: on a tie the earlier block (earlier token) stays
        best = torch.where(better, block_best, best)
        first = torch.where(better, block_first, first)
    return Explanation(token_index=first, similarity=best)


def centroid_maxsim_scores(
    centroid_scores: torch.Tensor,
    token_codes: np.ndarray,
    doc_offsets: np.ndarray,
    doc_indices: np.ndarray,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> torch.Tensor:
    """MaxSim with every token replaced by its centroid (PLAID's centroid interaction):
    centroid_scores (C, Q) holds <query, centroid>, so each block is a table lookup, no matmul."""
    layout = _Layout(doc_offsets, doc_indices, centroid_scores.device)
    maxima = torch.full((layout.n_docs, centroid_scores.shape[1]), -torch.inf, device=centroid_scores.device)
    for block in layout.blocks(block_tokens):
        codes = torch.from_numpy(token_codes[block.rows.cpu().numpy()].astype(np.int64)).to(centroid_scores.device)
        sims = centroid_scores.index_select(0, codes)
        maxima.scatter_reduce_(0, block.segments[:, None].expand_as(sims), sims, "amax", include_self=True)
    return maxima.sum(dim=1)


def bf16_error_bound(query: torch.Tensor, max_token_norm: float) -> float:
    """A bound on |bf16 score - float32 score| for any document whose tokens have norm at most
    max_token_norm. Per dot product, rounding query and token to bf16 costs 2u + u^2 relative to
    sum|q_i t_i| <= |q||t|, the bf16 result adds u, float32 accumulation adds dim * u32; max
    over tokens is 1-Lipschitz; the sum over query tokens adds n_q * u32. The float32 pass it is
    compared with has the same two float32 terms. Scaled by 1.01 for higher-order terms."""
    n_q, dim = query.shape
    u, u32 = BF16_UNIT_ROUNDOFF, FP32_UNIT_ROUNDOFF
    per_dot = 3 * u + 4 * u * u + 2 * (dim + n_q) * u32 / (1 - (dim + n_q) * u32)
    norms = float(query.detach().to(torch.float64).norm(dim=1).sum())
    return 1.01 * per_dot * norms * max_token_norm


def _segment_maxima(
    query: torch.Tensor,
    tokens: Tokens,
    doc_offsets: np.ndarray | torch.Tensor,
    doc_indices: np.ndarray,
    block_tokens: int,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """(n_docs, Q) float32 maxima of <query, token> per document."""
    store = _store(tokens)
    _check_shapes(query, store, block_tokens)
    layout = _Layout(doc_offsets, doc_indices, store.device)
    q_t = _query_t(query, store.device, compute_dtype)
    maxima = torch.full((layout.n_docs, query.shape[0]), -torch.inf, dtype=torch.float32, device=store.device)
    for block in layout.blocks(block_tokens):
        sims = _block_sims(store, block, q_t, query.shape[0])
        maxima.scatter_reduce_(0, block.segments[:, None].expand_as(sims), sims, "amax", include_self=True)
    return maxima


def _store(tokens: Tokens) -> TokenStore:
    if isinstance(tokens, TokenStore):
        return tokens
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (N_tok, dim) tensor, got shape {tuple(tokens.shape)}")
    return DenseTokens(tokens, codec=str(tokens.dtype).removeprefix("torch."), max_norm=float("inf"))


def _check_shapes(query: torch.Tensor, store: TokenStore, block_tokens: int) -> None:
    if query.ndim != 2 or query.shape[1] != store.dim:
        raise ValueError(f"query shape {tuple(query.shape)} does not match tokens ({store.rows}, {store.dim})")
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")


@dataclass(frozen=True)
class _Block:
    rows: torch.Tensor  # token rows to gather
    segments: torch.Tensor  # position of each row's document in doc_indices
    within_doc: torch.Tensor  # each row's index inside its document


class _Layout:
    """The concatenated token ranges of the selected documents, cut into blocks."""

    def __init__(self, doc_offsets: np.ndarray | torch.Tensor, doc_indices: np.ndarray, device: torch.device) -> None:
        offsets = doc_offsets.cpu().numpy() if isinstance(doc_offsets, torch.Tensor) else np.asarray(doc_offsets)
        indices = np.asarray(doc_indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError("doc_indices must be one-dimensional")
        if indices.size and (indices.min() < 0 or indices.max() >= offsets.shape[0] - 1):
            raise IndexError("doc_indices refers to a document outside doc_offsets")
        self.n_docs = indices.shape[0]
        self.starts = offsets[indices].astype(np.int64)
        self.cum = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(offsets[indices + 1] - self.starts, out=self.cum[1:])
        self.device = device

    def blocks(self, block_tokens: int) -> Iterator[_Block]:
        if self.device.type == "cuda":
            yield from self._device_blocks(block_tokens)
            return
        total = int(self.cum[-1])
        for begin in range(0, total, block_tokens):
            end = min(total, begin + block_tokens)
            pos = np.arange(begin, end, dtype=np.int64)
            if short := -(end - begin) % ROW_QUANTUM:
                pos = np.concatenate([pos, np.full(short, end - 1, dtype=np.int64)])
            seg = np.searchsorted(self.cum, pos, side="right") - 1
            within = pos - self.cum[seg]
            yield _Block(
                rows=torch.from_numpy(self.starts[seg] + within).to(self.device),
                segments=torch.from_numpy(seg).to(self.device),
                within_doc=torch.from_numpy(within).to(self.device),
            )


    def _device_blocks(self, block_tokens: int) -> Iterator[_Block]:
        """The same blocks computed on the GPU (no padding: no oneDNN shape cache there): only
        the per-document starts and lengths cross the bus, not a row index per token."""
        total = int(self.cum[-1])
        if total == 0:
            return
        starts = torch.from_numpy(self.starts).to(self.device, non_blocking=True)
        cum = torch.from_numpy(self.cum).to(self.device, non_blocking=True)
        for begin in range(0, total, block_tokens):
            end = min(total, begin + block_tokens)
            # Documents overlapping [begin, end): their token ranges clipped to the block.
            first = int(np.searchsorted(self.cum, begin, side="right")) - 1
            last = int(np.searchsorted(self.cum, end, side="left"))
            docs = torch.arange(first, last, device=self.device)
            lo = torch.clamp(cum[first:last], min=begin)
            hi = torch.clamp(cum[first + 1:last + 1], max=end)
            counts = hi - lo
            seg = torch.repeat_interleave(docs, counts, output_size=end - begin)
            pos = torch.arange(begin, end, device=self.device)
            within = pos - cum[seg]
            yield _Block(rows=starts[seg] + within, segments=seg, within_doc=within)


def _query_t(query: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dim, Q') in the compute dtype, zero-padded to Q' = a multiple of QUERY_PAD: CPU float32
    matmuls run ~3x faster at 16 columns than at 15. tokens @ q_t keeps the long axis first,
    the fast orientation for skinny matmuls on CPU."""
    n_q, dim = query.shape
    padded = torch.zeros((dim, -(-n_q // QUERY_PAD) * QUERY_PAD), dtype=dtype, device=device)
    padded[:, :n_q] = query.to(device=device, dtype=torch.float32).to(dtype).T
    return padded


def _block_sims(store: TokenStore, block: _Block, q_t: torch.Tensor, n_q: int) -> torch.Tensor:
    """(rows, n_q) float32 similarities of the block's tokens to the (unpadded) query."""
    # float32 from the store: exact for fp16 storage, and on CPU fp16 -> fp32 -> bf16 beats fp16 -> bf16.
    gathered = store.gather(block.rows)
    return torch.mm(gathered.to(q_t.dtype), q_t)[:, :n_q].to(torch.float32)
