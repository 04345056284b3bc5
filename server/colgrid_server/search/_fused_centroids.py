"""Centroid interaction (PLAID stage 2) on a GPU as one fused Triton kernel.

Ranking a probe's candidates scores each document as MaxSim with every token replaced by its
centroid: a table (C, Q) of <centroid, query token> looked up by the tokens' codes, a maximum
per document and query token, a sum. The torch path (`centroid_maxsim_scores`) gathers the
candidates' codes on the host, sends them, and folds them with a scatter-max: on a GPU that was
most of a default search (bench/README.md, GPU path). Here the codes live on the device, one
program per candidate reads its codes, looks them up in the table (C x Q float32: L2-resident
for any realistic C) and keeps the maxima in registers: one launch, one small result.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from colgrid_server.search._fused import available, launch_guard, tl, triton

_log = logging.getLogger(__name__)

# Query tokens per program: up to this many, the maxima fit in registers; longer queries (rare:
# a query is ~32 tokens) keep the torch path.
MAX_QUERY_TOKENS = 128
BLOCK_TOKENS = 32


def _centroid_source(codes_ptr, starts_ptr, lengths_ptr, table_ptr, out_ptr, n_q, BLOCK_T: tl.constexpr,
                     BLOCK_Q: tl.constexpr):  # fmt: skip
    doc = tl.program_id(0)
    start = tl.load(starts_ptr + doc)
    length = tl.load(lengths_ptr + doc)
    qs = tl.arange(0, BLOCK_Q)
    best = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for t0 in range(0, length, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        inside = ts < length
        codes = tl.load(codes_ptr + (start + ts).to(tl.int64), mask=inside, other=0).to(tl.int64)
        sims = tl.load(table_ptr + codes[:, None] * BLOCK_Q + qs[None, :], mask=inside[:, None], other=float("-inf"))
        best = tl.maximum(best, tl.max(sims, axis=0))
    total = tl.sum(tl.where(qs < n_q, best, 0.0), axis=0)
    tl.store(out_ptr + doc, total)


_KERNEL = triton.jit(_centroid_source, do_not_specialize=["n_q"]) if triton is not None else None


class FusedCentroidScores:
    """Centroid-interaction scores of candidate documents, computed by the fused kernel from the
    version's token codes held on the device (4 bytes per token)."""

    def __init__(self, token_codes: np.ndarray, doc_offsets: np.ndarray, device: torch.device) -> None:
        if not available(device):
            raise RuntimeError(f"the fused centroid kernel does not run on {device} in this process")
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets.shape[0] and offsets[-1] != token_codes.shape[0]:
            raise ValueError(f"doc_offsets end at {offsets[-1]}, there are {token_codes.shape[0]} token codes")
        self.device = device
        self.codes = torch.from_numpy(np.ascontiguousarray(token_codes, dtype=np.int32)).to(device)
        self._host_ranges = np.stack([offsets[:-1], np.diff(offsets)])

    @property
    def nbytes(self) -> int:
        return self.codes.element_size() * self.codes.nelement()

    def scores(self, table: torch.Tensor, docs: np.ndarray) -> torch.Tensor:
        """(len(docs),) float32 on the device: sum over query tokens of each document's largest
        table[code, q] over its tokens. table: (C, Q) float32 on the device, Q <= MAX_QUERY_TOKENS."""
        n_q = table.shape[1]
        if n_q > MAX_QUERY_TOKENS:
            raise ValueError(f"{n_q} query tokens: the fused centroid kernel takes at most {MAX_QUERY_TOKENS}")
        docs = np.asarray(docs, dtype=np.int64)
        out = torch.empty(docs.shape[0], dtype=torch.float32, device=self.device)
        if docs.shape[0] == 0:
            return out
        block_q = max(16, triton.next_power_of_2(n_q))
        padded = torch.zeros((table.shape[0], block_q), dtype=torch.float32, device=self.device)
        padded[:, :n_q] = table
        # Both rows 64-byte aligned (Triton compiles a variant per pointer alignment).
        ranges = np.zeros((2, -(-docs.shape[0] // 8) * 8), dtype=np.int64)
        ranges[:, : docs.shape[0]] = self._host_ranges[:, docs]
        ranges_t = torch.from_numpy(ranges).to(self.device)
        with launch_guard():
            _KERNEL[(docs.shape[0],)](self.codes, ranges_t[0], ranges_t[1], padded, out, n_q,
                                      BLOCK_T=BLOCK_TOKENS, BLOCK_Q=block_q, num_warps=4)  # fmt: skip
        return out


def fused_centroids_self_check(scorer: FusedCentroidScores, centroids: torch.Tensor, doc_offsets: np.ndarray,
                               documents: int = 16) -> bool:  # fmt: skip
    """Compile for the usual query widths and compare with the torch path on the first documents:
    False (and why, logged) where it fails or disagrees, so the caller keeps the torch path."""
    from colgrid_server.search._maxsim import centroid_maxsim_scores

    docs = np.arange(min(documents, scorer._host_ranges.shape[1]))
    if docs.shape[0] == 0:
        return True
    generator = torch.Generator().manual_seed(0)
    try:
        for n_q in (8, 32, 64):
            table = torch.randn((centroids.shape[0], n_q), generator=generator).to(scorer.device)
            got = scorer.scores(table, docs).cpu()
            want = centroid_maxsim_scores(table, scorer.codes.cpu().numpy(), doc_offsets, docs).cpu()
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-4):
                _log.warning("fused centroid self-check: differs from torch by %.3g", float((got - want).abs().max()))
                return False
    except Exception:  # noqa: BLE001 - a compiler or driver failure: report, do not serve through it
        _log.exception("fused centroid self-check failed")
        return False
    return True
