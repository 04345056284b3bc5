"""A GPU layout for exact MaxSim: documents grouped by padded length into dense float16 buckets.

The segment kernel (`_segment_maxima`) gathers candidate rows one by one and folds their
similarities with a scatter-max: on a GPU both are bound by scattered memory traffic, not by the
matmul (8% of the fp32 matmul's rate on an H200, bench/README.md). Here every document lives in
a bucket (n, L, dim) with L its length rounded up (padding repeats its last token, which changes
no maximum), so a candidate is one contiguous (L, dim) slab: selecting candidates is a coalesced
index_select along the first axis, the similarities one matmul per chunk, and the per-document
maximum an amax over L of a dense (n, L, Q) tensor. An exhaustive search reads each bucket as it
is, without any gather. Costs a second, padded copy of the tokens on the device.
"""
from __future__ import annotations

import numpy as np
import torch

# Lengths round up to a multiple of SHORT_QUANTUM up to LONG_FROM tokens, of LONG_QUANTUM past
# it: few buckets (kernel launches per search), padding ~1/6 of a 100-token document.
SHORT_QUANTUM = 32
LONG_FROM = 512
LONG_QUANTUM = 128
CHUNK_TOKENS = 1 << 20  # padded tokens per matmul: (2^20 x 32) float32 similarities = 128 MB


def padded_length(length: int) -> int:
    quantum = SHORT_QUANTUM if length <= LONG_FROM else LONG_QUANTUM
    return -(-length // quantum) * quantum


class PaddedDocuments:
    """Every document's tokens in a bucket of documents of the same padded length."""

    def __init__(self, tokens: torch.Tensor, doc_offsets: np.ndarray) -> None:
        """tokens: (N_tok, dim) on the device the searches run on; doc_offsets: CSR (N_doc + 1)."""
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        lengths = np.diff(offsets)
        if lengths.size and lengths.min() <= 0:
            raise ValueError("every document needs at least one token")
        self.device, self.dim = tokens.device, tokens.shape[1]
        padded = np.array([padded_length(int(n)) for n in lengths], dtype=np.int64)
        self.bucket_lengths = np.unique(padded)
        self.bucket_of = np.searchsorted(self.bucket_lengths, padded)  # (N_doc,)
        self.position = np.zeros(lengths.shape[0], dtype=np.int64)  # index inside its bucket
        self.buckets: list[torch.Tensor] = []
        for b, length in enumerate(self.bucket_lengths.tolist()):
            docs = np.flatnonzero(self.bucket_of == b)
            self.position[docs] = np.arange(docs.shape[0])
            bucket = torch.empty((docs.shape[0], length, self.dim), dtype=tokens.dtype, device=self.device)
            per_chunk = max(1, CHUNK_TOKENS // length)
            for first in range(0, docs.shape[0], per_chunk):
                part = docs[first : first + per_chunk]
                within = np.minimum(np.arange(length)[None, :], lengths[part][:, None] - 1)
                rows = torch.from_numpy((offsets[part][:, None] + within).reshape(-1)).to(self.device)
                bucket[first : first + part.shape[0]] = tokens.index_select(0, rows).view(part.shape[0], length, self.dim)
            self.buckets.append(bucket)
        self._out_dtype_mm = _supports_out_dtype(self.device, tokens.dtype)

    def close(self) -> None:
        """Free the buckets (device memory); maxima() must not be called afterwards."""
        self.buckets = []

    @property
    def nbytes(self) -> int:
        return sum(b.element_size() * b.nelement() for b in self.buckets)

    def maxima(self, query: torch.Tensor, docs: np.ndarray) -> torch.Tensor:
        """(len(docs), Q) float32: per document, the largest similarity of each query token
        to any of its tokens (float32 accumulation of the stored values)."""
        docs = np.asarray(docs, dtype=np.int64)
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query shape {tuple(query.shape)} does not match the documents' dim {self.dim}")
        out = torch.empty((docs.shape[0], query.shape[0]), dtype=torch.float32, device=self.device)
        if docs.shape[0] == 0:
            return out
        q_t = query.to(device=self.device, dtype=torch.float32).T.contiguous()
        q_stored = _split_query(q_t, self.buckets[0].dtype) if self._out_dtype_mm else q_t
        buckets = self.bucket_of[docs]
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(len(self.buckets) + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            where = order[bounds[b] : bounds[b + 1]]  # positions in docs of this bucket's documents
            bucket, length = self.buckets[b], int(self.bucket_lengths[b])
            everyone = where.shape[0] == bucket.shape[0]  # exhaustive: no gather at all
            positions = self.position[docs[where]]
            if everyone and not np.array_equal(positions, np.arange(bucket.shape[0])):
                everyone = False
            per_chunk = max(1, CHUNK_TOKENS // length)
            for first in range(0, where.shape[0], per_chunk):
                part = slice(first, first + per_chunk)
                slabs = bucket[part] if everyone else bucket.index_select(
                    0, torch.from_numpy(positions[part]).to(self.device))  # fmt: skip
                sims = self._mm(slabs.reshape(-1, self.dim), q_t, q_stored)
                best = sims.view(slabs.shape[0], length, -1).amax(dim=1)
                out[torch.from_numpy(where[part]).to(self.device)] = best
        return out

    def _mm(self, tokens: torch.Tensor, q_t: torch.Tensor, q_stored: torch.Tensor) -> torch.Tensor:
        if self._out_dtype_mm:
            # float16 operands, float32 accumulation and output: the tokens are read once, as
            # stored. The query's two float16 parts (see _split_query) add back in float32.
            both = torch.mm(tokens, q_stored, out_dtype=torch.float32)
            n_q = q_t.shape[1]
            return both[:, :n_q] + both[:, n_q:]
        return torch.mm(tokens.to(torch.float32), q_t)


def _split_query(q_t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(dim, 2Q): a float32 query as hi + lo in dtype, side by side. A float16 product is exact in
    float32, so tokens @ hi + tokens @ lo equals tokens @ q to ~2^-22 relative (the part of q
    below lo), float32 rounding rather than the 2^-11 of rounding q itself to float16."""
    hi = q_t.to(dtype)
    lo = (q_t - hi.to(torch.float32)).to(dtype)
    return torch.cat([hi, lo], dim=1).contiguous()


def _supports_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm takes float16/bfloat16 operands with a float32 output here (CUDA, recent
    torch); elsewhere the operands are converted to float32 first."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        a = torch.ones((4, 4), dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False
