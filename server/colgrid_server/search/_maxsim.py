"""Exact MaxSim over a subset of documents, segment-wise: the candidates' token ranges are
gathered (and decoded, for a compressed store) a bounded block at a time, one matmul per block,
and a scatter 'amax' folds each block's similarities into per-(document, query token) maxima.
No Python loop per document; a document may span several blocks.

Tokens are a float16 tensor (the stored values) or any `TokenStore`; scores are exact for the
float32 vectors the store decodes to. Two approximate passes with proven error bounds let a
search re-score exactly only the documents that can still reach its top k: bfloat16
(`bf16_error_bound`), and int8 over a resident `Int8Screen` (`int8_screen_scores`)."""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from colgrid_server.index import DenseTokens, TokenStore
from colgrid_server.index._stores import INT8_LEVELS, Int8Screen

Tokens = torch.Tensor | TokenStore

DEFAULT_BLOCK_TOKENS = 8192  # (8192 x dim) floats per block: cache-sized on CPU, small on GPU
QUERY_PAD = 16
# Block rows are padded to a multiple of this (repeating the last row: a repeat changes no
# maximum). oneDNN compiles and caches a kernel per matmul shape, ~0.6 MB each: with the last
# block's size free, a long-running server kept growing; with it bounded, at most
# DEFAULT_BLOCK_TOKENS / ROW_QUANTUM shapes per query width.
ROW_QUANTUM = 256
# Documents' rows in the int8 pass are padded to multiples of this (see _Layout): a 16-row
# reshape-amax plus a scatter of 1/16 of the rows took ~1/6 of the time of a row-wise scatter.
SCREEN_ALIGN = 16
SELECTED_CHUNK_TOKENS = 4 * ROW_QUANTUM
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
        sims = _block_sims(store, block.rows, q_t, shape[1])
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


@dataclass(frozen=True)
class ScreenedScores:
    """The int8 pass over candidates: approximate scores with a per-document bound,
    |scores[i] - s| <= error[i] for the float32 score s `maxsim_scores` computes, and what
    `screened_exact_scores` needs to score any of them exactly."""

    scores: np.ndarray  # float64 (n_docs,)
    error: np.ndarray  # float64 (n_docs,)
    # int32 (n_docs, n_q): a token whose int8 similarity (codes . query_codes) to query token q
    # is below threshold[i, q] cannot hold document i's float32 maximum for q.
    threshold: torch.Tensor
    query_codes: torch.Tensor  # int8 (dim, Q'): the query as the pass scored it


def int8_screen_scores(
    query: torch.Tensor,
    screen: Int8Screen,
    doc_offsets: np.ndarray | torch.Tensor,
    doc_indices: np.ndarray,
    *,
    max_token_norm: float,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> ScreenedScores:
    """MaxSim over the screen's int8 codes (CPU), one int8 x int8 -> int32 matmul per block.
    With the query scaled by the screen's per-dimension scales, p = q * scale = step * p8 + dp
    (p8 int8), and a token t = scale * codes + e:  q . t = step * (p8 . codes) + dp . codes + q . e,
    so each (document, query token) maximum is off by at most  |q| max|e| + |dp| max|codes|
    over the document's tokens (doc_error, doc_code_norm), plus the float32 rounding of the exact
    pass it stands in for. max_token_norm bounds every stored token's norm (TokenStore.max_norm)."""
    codes = screen.codes
    if query.ndim != 2 or query.shape[1] != codes.shape[1]:
        raise ValueError(f"query shape {tuple(query.shape)} does not match the screen's tokens {tuple(codes.shape)}")
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    layout = _Layout(doc_offsets, doc_indices, codes.device, align=SCREEN_ALIGN)
    q = _screen_query(query, screen.scale)
    n_q, dim = query.shape

    def maxima_of(part: Iterator[tuple[_Block, torch.Tensor]]) -> torch.Tensor:
        maxima = torch.full((layout.n_docs, q.codes.shape[1]), torch.iinfo(torch.int32).min, dtype=torch.int32)
        for block, gathered in part:
            sims = torch._int_mm(gathered, q.codes)
            runs = sims.view(-1, SCREEN_ALIGN, sims.shape[1]).amax(dim=1)  # each run is one document's
            run_docs = block.segments[::SCREEN_ALIGN, None].expand_as(runs)
            maxima.scatter_reduce_(0, run_docs, runs, "amax", include_self=True)
        return maxima

    parts = _in_parallel(lambda first, stop: maxima_of(_int8_blocks(codes, layout, block_tokens, first, stop)),
                         layout.n_blocks(block_tokens))
    maxima = functools.reduce(torch.maximum, parts[1:], parts[0])
    docs = np.asarray(doc_indices, dtype=np.int64)
    best = maxima[:, :n_q].numpy().astype(np.int64)
    approx = best * q.step
    per_max = screen.doc_error[docs][:, None] * q.norms + screen.doc_code_norm[docs][:, None] * q.error  # (n_docs, n_q)
    rounding = _gamma(dim) * max_token_norm * q.norms  # float32 dot products of the exact pass, per query token
    error = 1.01 * (per_max.sum(axis=1) + rounding.sum() + _gamma(n_q) * max_token_norm * q.norms.sum())
    error += 1e-12 * np.abs(approx).sum(axis=1)  # float64 rounding of the approximate scores
    # The float32 maximum's token t' has int8 similarity >= best - (2 e + 2 g) / step: it is within
    # g of the exact maximum, which is within e of the approximate one.
    slack = np.floor(1.01 * (2 * per_max + 2 * rounding) / q.step) + 1
    threshold = np.maximum(best - np.minimum(slack, 2.0**32), torch.iinfo(torch.int32).min).astype(np.int32)
    return ScreenedScores(scores=approx.sum(axis=1), error=error, threshold=torch.from_numpy(threshold), query_codes=q.codes)


def screened_exact_scores(
    query: torch.Tensor,
    store: TokenStore,
    doc_offsets: np.ndarray | torch.Tensor,
    doc_indices: np.ndarray,
    screened: ScreenedScores,
    keep: np.ndarray,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> torch.Tensor:
    """float32 scores of doc_indices[keep], equal to `maxsim_scores` of those documents (up to
    float32 summation order inside the matmul), screened being `int8_screen_scores` of
    doc_indices. Only tokens whose int8 similarity reaches a (document, query token) threshold
    are scored in float32: every float32 maximum is among them, and they are a few per cent of
    the tokens."""
    if store.screen is None:
        raise ValueError("the store has no int8 screen")
    keep = np.asarray(keep, dtype=np.int64)
    layout = _Layout(doc_offsets, np.asarray(doc_indices, dtype=np.int64)[keep], store.device, align=SCREEN_ALIGN)
    threshold = screened.threshold.index_select(0, torch.from_numpy(keep))
    n_q = threshold.shape[1]

    def selected(part: Iterator[tuple[_Block, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        rows, segments = [], []
        for block, gathered in part:
            sims = torch._int_mm(gathered, screened.query_codes)[:, :n_q].view(-1, SCREEN_ALIGN, n_q)
            run_threshold = threshold.index_select(0, block.segments[::SCREEN_ALIGN])[:, None, :]
            hit = (sims >= run_threshold).any(dim=2).view(-1)
            rows.append(block.rows[hit])
            segments.append(block.segments[hit])
        return rows, segments

    codes = store.screen.codes
    parts = _in_parallel(lambda first, stop: selected(_int8_blocks(codes, layout, block_tokens, first, stop)),
                         layout.n_blocks(block_tokens))
    rows = [r for part_rows, _ in parts for r in part_rows]
    if not rows:
        return torch.full((layout.n_docs, n_q), -torch.inf, dtype=torch.float32).sum(dim=1)
    all_rows, all_segments = torch.cat(rows), torch.cat([s for _, part_segments in parts for s in part_segments])
    q_t = _query_t(query, store.device, torch.float32)

    # The selected rows (a few per cent) in small chunks, so that even a few thousand split.
    chunk = min(block_tokens, SELECTED_CHUNK_TOKENS)

    def exact_maxima(first: int, stop: int) -> torch.Tensor:
        maxima = torch.full((layout.n_docs, n_q), -torch.inf, dtype=torch.float32)
        for begin in range(first * chunk, min(stop * chunk, all_rows.shape[0]), chunk):
            block_rows = _pad_rows(all_rows[begin : begin + chunk])
            block_segments = _pad_rows(all_segments[begin : begin + chunk])
            sims = _block_sims(store, block_rows, q_t, n_q)
            maxima.scatter_reduce_(0, block_segments[:, None].expand_as(sims), sims, "amax", include_self=True)
        return maxima

    maxima = _in_parallel(exact_maxima, -(-all_rows.shape[0] // chunk))
    return functools.reduce(torch.maximum, maxima[1:], maxima[0]).sum(dim=1)


@dataclass(frozen=True)
class _ScreenQuery:
    codes: torch.Tensor  # int8 (dim, Q'), zero-padded columns
    step: np.ndarray  # float64 (n_q,): the value of one unit of codes . query_codes
    error: np.ndarray  # float64 (n_q,): |dp|
    norms: np.ndarray  # float64 (n_q,): |q|


def _screen_query(query: torch.Tensor, scale: np.ndarray) -> _ScreenQuery:
    q = query.detach().to("cpu", torch.float64).numpy()
    n_q, dim = q.shape
    if dim * INT8_LEVELS * INT8_LEVELS >= 2**31:
        raise ValueError(f"int8 products of {dim} dimensions could overflow int32")
    p = q * scale
    step = np.abs(p).max(axis=1) / INT8_LEVELS
    step = np.where(step > 0, step, 1.0)
    codes = np.rint(p / step[:, None])
    matrix = np.zeros((dim, -(-n_q // QUERY_PAD) * QUERY_PAD), dtype=np.int8)
    matrix[:, :n_q] = codes.T
    error = np.linalg.norm(p - codes * step[:, None], axis=1)
    return _ScreenQuery(torch.from_numpy(matrix), step, error, np.linalg.norm(q, axis=1))


def _int8_blocks(
    codes: torch.Tensor, layout: _Layout, block_tokens: int, first: int = 0, stop: int | None = None
) -> Iterator[tuple[_Block, torch.Tensor]]:
    """Blocks first..stop-1 (all by default) with their gathered codes, in one reused buffer (a
    fresh one per block costs page faults comparable to the copy itself)."""
    rows = -(-min(block_tokens, int(layout.cum[-1])) // layout.align) * layout.align
    buffer = torch.empty((_padded(rows), codes.shape[1]), dtype=torch.int8)
    for block in layout.blocks(block_tokens, first, stop):
        yield block, torch.index_select(codes, 0, block.rows, out=buffer[: block.rows.shape[0]])


_T = TypeVar("_T")
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _in_parallel(work: Callable[[int, int], _T], n_blocks: int) -> list[_T]:
    """work(first, stop) over blocks 0..n_blocks-1, split into contiguous runs across torch's
    thread count (torch.get_num_threads()): each run in a pool thread whose ops use one thread.
    These passes are many small ops per block: split inside each op, threads meet at every op
    and scale poorly (worse still on a busy host); split by blocks, they meet once."""
    threads = torch.get_num_threads()
    workers = min(threads, n_blocks)
    if workers <= 1:
        return [work(0, n_blocks)]
    bounds = np.linspace(0, n_blocks, workers + 1).round().astype(int)

    def run(first: int, stop: int) -> _T:
        # torch's count is process-wide, OpenMP's per thread: this sets both for this pool
        # thread; the caller puts the process-wide one back below.
        torch.set_num_threads(1)
        return work(first, stop)

    try:
        return list(_pool().map(run, bounds[:-1].tolist(), bounds[1:].tolist()))
    finally:
        torch.set_num_threads(threads)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="colgrid-maxsim")
        return _POOL


def _gamma(n: int, u: float = FP32_UNIT_ROUNDOFF) -> float:
    return n * u / (1 - n * u)


def _padded(rows: int) -> int:
    return max(ROW_QUANTUM, -(-rows // ROW_QUANTUM) * ROW_QUANTUM)


def _pad_rows(values: torch.Tensor) -> torch.Tensor:
    """values padded to a multiple of ROW_QUANTUM by repeating the last one (see ROW_QUANTUM)."""
    short = _padded(values.shape[0]) - values.shape[0]
    return torch.cat([values, values[-1:].expand(short)]) if short else values


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
        sims = _block_sims(store, block.rows, q_t, query.shape[0])
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
    """The concatenated token ranges of the selected documents, cut into blocks.

    align > 1 (CPU): each document's range is padded to a multiple of align rows by repeating
    its last token (a repeat changes no maximum), so that every aligned run of align rows of a
    block belongs to one document: a reshape and amax then reduce it, and the scatter that
    follows has align times fewer rows."""

    def __init__(
        self, doc_offsets: np.ndarray | torch.Tensor, doc_indices: np.ndarray, device: torch.device, *, align: int = 1
    ) -> None:
        offsets = doc_offsets.cpu().numpy() if isinstance(doc_offsets, torch.Tensor) else np.asarray(doc_offsets)
        indices = np.asarray(doc_indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError("doc_indices must be one-dimensional")
        if indices.size and (indices.min() < 0 or indices.max() >= offsets.shape[0] - 1):
            raise IndexError("doc_indices refers to a document outside doc_offsets")
        if align > 1 and (device.type == "cuda" or ROW_QUANTUM % align):
            raise ValueError(f"align={align} needs the CPU layout and must divide {ROW_QUANTUM}")
        self.n_docs = indices.shape[0]
        self.align = align
        self.starts = offsets[indices].astype(np.int64)
        self.lengths = offsets[indices + 1] - self.starts
        self.cum = np.zeros(self.n_docs + 1, dtype=np.int64)
        np.cumsum(-(-self.lengths // align) * align, out=self.cum[1:])
        self.device = device

    def n_blocks(self, block_tokens: int) -> int:
        return -(-int(self.cum[-1]) // self._block_tokens(block_tokens))

    def _block_tokens(self, block_tokens: int) -> int:
        return -(-block_tokens // self.align) * self.align

    def blocks(self, block_tokens: int, first_block: int = 0, stop_block: int | None = None) -> Iterator[_Block]:
        """Blocks first_block..stop_block-1 (all by default)."""
        if self.device.type == "cuda":
            yield from self._device_blocks(block_tokens)
            return
        total = int(self.cum[-1])
        block_tokens = self._block_tokens(block_tokens)
        last_row = self.lengths - 1
        stop = total if stop_block is None else min(total, stop_block * block_tokens)
        for begin in range(first_block * block_tokens, stop, block_tokens):
            end = min(total, begin + block_tokens)
            # Documents overlapping [begin, end), their token counts clipped to the block; the
            # last one's repeated to pad the block (see ROW_QUANTUM).
            first = int(np.searchsorted(self.cum, begin, side="right")) - 1
            last = int(np.searchsorted(self.cum, end, side="left"))
            counts = np.minimum(self.cum[first + 1 : last + 1], end) - np.maximum(self.cum[first:last], begin)
            counts[-1] += -(end - begin) % ROW_QUANTUM
            seg = np.repeat(np.arange(first, last, dtype=np.int64), counts)
            pos = np.minimum(np.arange(begin, begin + seg.shape[0], dtype=np.int64), end - 1)
            within = pos - self.cum[seg]
            if self.align > 1:
                within = np.minimum(within, last_row[seg])
            yield _Block(
                rows=torch.from_numpy(self.starts[seg] + within),
                segments=torch.from_numpy(seg),
                within_doc=torch.from_numpy(within),
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


def _block_sims(store: TokenStore, rows: torch.Tensor, q_t: torch.Tensor, n_q: int) -> torch.Tensor:
    """(rows, n_q) float32 similarities of the given tokens to the (unpadded) query."""
    # float32 from the store: exact for fp16 storage, and on CPU fp16 -> fp32 -> bf16 beats fp16 -> bf16.
    gathered = store.gather(rows)
    return torch.mm(gathered.to(q_t.dtype), q_t)[:, :n_q].to(torch.float32)
