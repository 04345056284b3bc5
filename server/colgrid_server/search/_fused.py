"""Exact MaxSim on a GPU as one fused Triton kernel: each candidate's tokens are read once.

The padded layout (`_padded.py`) gathers candidate slabs into a scratch tensor, multiplies it by
the query and writes a (tokens x Q) float32 similarity tensor that an amax then reads back: about
four bytes moved per byte of candidate tokens, so at most ~25% of the memory bandwidth. Here
one program per (candidate, block of query tokens) streams the candidate's float16 rows straight
from the resident token matrix, multiplies each tile by the query on the tensor cores (float32
accumulation) and keeps the running maximum per query token in registers: the only traffic is
the candidates' bytes, read once, and a (candidates x Q) float32 result. No padded copy either.

The query is split into two float16 parts (hi + lo, see `_padded._split_query`): each product
of float16 values is exact in float32, so the scores keep float32 accuracy (the float64
reference's top-10, tests/test_fused_maxsim.py) rather than the 2^-11 of a float16 query.

On CPU the same kernel source runs in Triton's interpreter (numpy): that is how the CPU test
suite checks this code path; serving on CPU uses the screened passes of `_maxsim.py` instead.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

_log = logging.getLogger(__name__)

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # No GPU: Triton's only backend here is its interpreter, chosen when triton.language is
    # imported (its own helpers, tl.max and tl.zeros, are jit functions too).
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # Triton ships with torch on Linux; without it the padded layout serves.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = tl = None


def available(device: torch.device) -> bool:
    """Whether the kernel runs on device: compiled on a GPU, interpreted (slowly: tests) on CPU."""
    return triton is not None and (device.type == "cpu") == _interpreted()


def _interpreted() -> bool:
    return bool(triton.knobs.runtime.interpret)


_INTERPRETER_LOCK = threading.Lock()


def launch_guard() -> AbstractContextManager:
    """Triton's interpreter patches triton.language module-wide while a kernel runs and restores
    it after, so concurrent interpreted launches (CPU tests of concurrent searches) take turns;
    compiled launches need no lock."""
    return _INTERPRETER_LOCK if triton is not None and _interpreted() else nullcontext()


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel configuration (bench/bench_gpu.py sweeps these; the default is its best)."""

    block_tokens: int = 64  # token rows per tile
    warps: int = 4
    stages: int = 3  # software pipelining depth of the tile loads


DEFAULT_CONFIG = LaunchConfig()


def _maxsim_source(
    tokens_ptr, starts_ptr, lengths_ptr, q_hi_ptr, q_lo_ptr, out_ptr,
    dim, q_blocks,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr,
):  # fmt: skip
    # Programs of one candidate are adjacent in launch order, so its rows, when Q spans several
    # blocks (batched searches), come from L2 after the first block's read.
    pid = tl.program_id(0)
    doc = pid // q_blocks
    q_block = pid % q_blocks
    start = tl.load(starts_ptr + doc)
    length = tl.load(lengths_ptr + doc)
    qs = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    best = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for t0 in range(0, length, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        inside = ts < length
        rows = (start + ts).to(tl.int64)
        sims = tl.zeros((BLOCK_T, BLOCK_Q), dtype=tl.float32)
        for d_block in tl.static_range(D_BLOCKS):
            ds = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
            d_in = ds < dim
            x = tl.load(tokens_ptr + rows[:, None] * dim + ds[None, :], mask=inside[:, None] & d_in[None, :], other=0.0)
            q_offsets = qs[None, :].to(tl.int64) * dim + ds[:, None]  # (BLOCK_D, BLOCK_Q): the query transposed
            q_hi = tl.load(q_hi_ptr + q_offsets, mask=d_in[:, None], other=0.0)
            q_lo = tl.load(q_lo_ptr + q_offsets, mask=d_in[:, None], other=0.0)
            sims += tl.dot(x, q_hi)
            sims += tl.dot(x, q_lo)
        sims = tl.where(inside[:, None], sims, float("-inf"))
        best = tl.maximum(best, tl.max(sims, axis=0))
    tl.store(out_ptr + doc.to(tl.int64) * (q_blocks * BLOCK_Q) + qs, best)


# q_blocks varies with a batch's query tokens: one compiled variant for all of its values.
_KERNEL = triton.jit(_maxsim_source, do_not_specialize=["q_blocks"]) if triton is not None else None
try:
    from triton.runtime.errors import OutOfResources as _OutOfResources
except ImportError:  # pragma: no cover - older or newer Triton layouts
    _OutOfResources = RuntimeError


class FusedMaxima:
    """Per-document maxima of query-token similarities over float16 tokens resident on a device,
    computed by the fused kernel (`maxima` has the `MaximaFn` shape of `_batched.py`)."""

    def __init__(self, tokens: torch.Tensor, doc_offsets: np.ndarray, config: LaunchConfig = DEFAULT_CONFIG) -> None:
        """tokens: (N_tok, dim) float16 or bfloat16, contiguous, on the device searches run on;
        doc_offsets: CSR (N_doc + 1)."""
        if not available(tokens.device):
            raise RuntimeError(f"the fused MaxSim kernel does not run on {tokens.device} in this process"
                               " (Triton missing, or imported for the other device)")
        if tokens.dtype not in (torch.float16, torch.bfloat16) or tokens.ndim != 2:
            raise ValueError(f"fused MaxSim reads 2-D float16/bfloat16 tokens, not {tokens.dtype} {tuple(tokens.shape)}")
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets.shape[0] and offsets[-1] != tokens.shape[0]:
            raise ValueError(f"doc_offsets end at {offsets[-1]}, the token matrix has {tokens.shape[0]} rows")
        self.tokens = tokens.contiguous()
        self.device, self.dim = tokens.device, tokens.shape[1]
        self.config = config
        # (2, N_doc): each document's first row and its length, on the host and on the device.
        self._n_docs = offsets.shape[0] - 1
        self._host_ranges = np.stack([offsets[:-1], np.diff(offsets)])
        padded = np.zeros((2, -(-self._n_docs // 8) * 8), dtype=np.int64)
        padded[:, : self._n_docs] = self._host_ranges
        self._ranges = torch.from_numpy(padded).to(self.device)
        self._fitted: dict[int, LaunchConfig] = {}  # per query-block width: the config that fits
        # The feature axis in power-of-two tiles of at most 128 (tl.dot wants >= 16 per side).
        self._block_d = min(128, max(16, triton.next_power_of_2(self.dim)))
        self._d_blocks = -(-self.dim // self._block_d)

    def close(self) -> None:
        """Nothing to free beside the version's own tokens (kept for the layouts' common shape)."""

    @property
    def nbytes(self) -> int:
        return 0  # reads the version's tokens in place: no copy

    def maxima(self, query: torch.Tensor, docs: np.ndarray) -> torch.Tensor:
        """(len(docs), Q) float32: per document, the largest similarity of each query token to
        any of its tokens (float32 accumulation of the stored float16 values)."""
        return self.launcher(query, docs)()

    def launcher(self, query: torch.Tensor, docs: np.ndarray) -> Callable[[], torch.Tensor]:
        """The kernel launch with its inputs prepared: calling it computes `maxima(query, docs)`
        (bench/bench_gpu.py times the kernel alone with it)."""
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query shape {tuple(query.shape)} does not match the documents' dim {self.dim}")
        docs = np.asarray(docs, dtype=np.int64)
        n_docs, n_q = docs.shape[0], query.shape[0]
        block_q = 16 if n_q <= 16 else 32 if n_q <= 32 else 64
        q_blocks = -(-n_q // block_q)
        out = torch.empty((n_docs, q_blocks * block_q), dtype=torch.float32, device=self.device)
        if n_docs == 0 or n_q == 0:
            return lambda: out[:, :n_q]
        # Inputs are prepared on the host and sent in two copies: a search's exact stage is ~0.1 ms
        # of kernel on a GPU, and a dozen small device ops around it cost more than that.
        q = torch.zeros((q_blocks * block_q, self.dim), dtype=torch.float32)
        q[:n_q] = query.detach().to(device="cpu", dtype=torch.float32)
        q_hi = q.to(self.tokens.dtype)
        q_parts = torch.stack([q_hi, (q - q_hi.to(torch.float32)).to(self.tokens.dtype)]).to(self.device)
        if n_docs == self._n_docs and np.array_equal(docs, np.arange(n_docs)):
            ranges = self._ranges  # every document, in order: nothing to send
        else:
            # Rows padded to a multiple of 8 entries: both stay 64-byte aligned (Triton compiles
            # a variant per pointer alignment).
            padded = np.zeros((2, -(-n_docs // 8) * 8), dtype=np.int64)
            padded[:, :n_docs] = self._host_ranges[:, docs]
            ranges = torch.from_numpy(padded).to(self.device)

        def launch() -> torch.Tensor:
            config = self._fitted.get(block_q, self.config)
            while True:
                try:
                    with launch_guard():
                        _KERNEL[(n_docs * q_blocks,)](
                            self.tokens, ranges[0], ranges[1], q_parts[0], q_parts[1], out,
                            self.dim, q_blocks,
                            BLOCK_T=config.block_tokens, BLOCK_Q=block_q, BLOCK_D=self._block_d, D_BLOCKS=self._d_blocks,
                            num_warps=config.warps, num_stages=config.stages,
                        )  # fmt: skip
                    break
                except _OutOfResources:  # this GPU's shared memory: a shallower pipeline, smaller tiles
                    config = _smaller(config)
            self._fitted[block_q] = config
            return out[:, :n_q]

        return launch


def _smaller(config: LaunchConfig) -> LaunchConfig:
    if config.stages > 1:
        return LaunchConfig(config.block_tokens, config.warps, config.stages - 1)
    if config.block_tokens > 16:
        return LaunchConfig(config.block_tokens // 2, config.warps, config.stages)
    raise RuntimeError("the fused MaxSim kernel fits no launch configuration on this GPU")


def fused_self_check(layout: FusedMaxima, documents: int = 8) -> bool:
    """Compile the kernel for every query-block width and compare its maxima on the first
    documents with torch's: False (and the reason logged) where it fails or disagrees, so a
    searcher can fall back instead of serving a broken kernel's scores."""
    n_docs = min(documents, layout._n_docs)
    if n_docs == 0:
        return True
    docs = np.arange(n_docs)
    generator = torch.Generator().manual_seed(0)
    try:
        for n_q in (16, 32, 64, 100):  # every query-block width, and several blocks
            query = torch.randn((n_q, layout.dim), generator=generator)
            got = layout.maxima(query, docs).cpu()
            for row, doc in enumerate(docs.tolist()):
                start, length = (int(x) for x in layout._host_ranges[:, doc])
                tokens = layout.tokens[start : start + length].to(torch.float32).cpu()
                want = (tokens @ query.T).amax(dim=0)
                if not torch.allclose(got[row], want, rtol=1e-4, atol=1e-3 * float(want.abs().max()) + 1e-6):
                    _log.warning("fused MaxSim self-check: document %d differs from torch by %.3g", doc,
                                 float((got[row] - want).abs().max()))
                    return False
    except Exception:  # noqa: BLE001 - a compiler or driver failure: report, do not serve through it
        _log.exception("fused MaxSim self-check failed")
        return False
    return True
