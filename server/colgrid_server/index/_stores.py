"""Token stores: a loaded version's token vectors in the layout the MaxSim kernel reads.

`gather(rows)` returns the float32 vectors of the given token rows; the kernel never needs to
know the codec. DenseTokens holds float16 values (an fp16 version, or a compressed one decoded
at load). Int8Tokens and ResidualTokens keep the codes resident and decode only the rows a
query scores: several times less memory, at the cost of decoding per query.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from colgrid_server.index._codecs import int8_decode, residual_decode


class TokenStore(ABC):
    """Read-only token vectors of one version. Thread-safe: no state changes after construction
    (close() aside, which the owner calls once nothing reads any more)."""

    codec: str
    dim: int
    rows: int
    device: torch.device
    max_norm: float  # an upper bound on the norm of any decoded token (bounds bf16 rounding error)
    screen: Int8Screen | None = None  # a resident int8 copy for the approximate pass, if loaded

    @abstractmethod
    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 (len(rows), dim) decoded vectors of the given token rows (int64, on device)."""

    def decode(self, start: int, stop: int) -> torch.Tensor:
        """float32 decoded vectors of rows [start, stop)."""
        return self.gather(torch.arange(start, stop, device=self.device))

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory held for the tokens."""

    @abstractmethod
    def close(self) -> None:
        """Drop the arrays."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(codec={self.codec!r}, rows={self.rows}, dim={self.dim}, nbytes={self.nbytes})"


class DenseTokens(TokenStore):
    """float16 values: exact float32 after conversion. With an `Int8Screen` (see there) the
    approximate pass of a CPU search reads the int8 copy instead."""

    def __init__(self, tokens: torch.Tensor, *, codec: str, max_norm: float, screen: Int8Screen | None = None) -> None:
        self.tokens = tokens
        self.codec = codec
        self.rows, self.dim = tokens.shape
        self.device = tokens.device
        self.max_norm = max_norm
        self.screen = screen

    def with_screen(self, doc_offsets: np.ndarray) -> DenseTokens:
        """The same tokens plus an int8 screening copy (1 byte per value more: x1.5 memory)."""
        return DenseTokens(self.tokens, codec=self.codec, max_norm=self.max_norm,
                           screen=Int8Screen.build(self.tokens, doc_offsets))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tokens.index_select(0, rows).to(torch.float32)

    def decode(self, start: int, stop: int) -> torch.Tensor:
        return self.tokens[start:stop].to(torch.float32)

    @property
    def nbytes(self) -> int:
        return self.tokens.element_size() * self.tokens.nelement() + (self.screen.nbytes if self.screen else 0)

    def close(self) -> None:
        self.tokens = torch.empty((0, self.dim), dtype=torch.float16)
        self.screen = None


class Int8Tokens(TokenStore):
    def __init__(self, q: torch.Tensor, scales: torch.Tensor, *, max_norm: float) -> None:
        self.q, self.scales = q, scales
        self.codec = "int8"
        self.rows, self.dim = q.shape
        self.device = q.device
        self.max_norm = max_norm

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return int8_decode(self.q.index_select(0, rows), self.scales.index_select(0, rows))

    @property
    def nbytes(self) -> int:
        return self.q.nelement() + 4 * self.scales.nelement()

    def close(self) -> None:
        self.q = torch.empty((0, self.dim), dtype=torch.int8)
        self.scales = torch.empty(0)


class ResidualTokens(TokenStore):
    """Packed residual buckets and centroid codes; centroids and the byte table are shared
    with the version (the centroids are resident for candidate generation anyway)."""

    def __init__(
        self,
        packed: torch.Tensor,
        codes: torch.Tensor,
        centroids: torch.Tensor,
        table: torch.Tensor,
        *,
        codec: str,
        dim: int,
        renormalize: bool,
    ) -> None:
        self.packed, self.codes, self.centroids, self.table = packed, codes, centroids, table
        self.codec, self.dim, self.renormalize = codec, dim, renormalize
        self.rows = packed.shape[0]
        self.device = packed.device
        self.max_norm = residual_max_norm(centroids, table, renormalize)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return residual_decode(
            self.packed.index_select(0, rows), self.codes.index_select(0, rows), self.centroids, self.table,
            self.dim, self.renormalize,
        )  # fmt: skip

    @property
    def nbytes(self) -> int:
        # Not the codes: they are the version's token_codes, resident for candidate generation.
        return self.packed.nelement() + 4 * self.table.nelement()

    def close(self) -> None:
        self.packed = torch.empty((0, self.packed.shape[1]), dtype=torch.uint8)
        self.codes = torch.empty(0, dtype=self.codes.dtype)


def residual_max_norm(centroids: torch.Tensor, table: torch.Tensor, renormalize: bool) -> float:
    """Upper bound on |centroid + residual|: 1 (plus rounding) when re-normalised, else the
    largest centroid norm plus the norm of the largest-magnitude bucket value of every dim."""
    if renormalize:
        return 1.0 + 1e-5
    largest = table.abs().view(table.shape[0] // 256, 256, -1).amax(dim=1)  # (width, per_byte)
    centroid = float(torch.linalg.vector_norm(centroids.to(torch.float64), dim=1).max())
    return centroid + math.sqrt(float(largest.to(torch.float64).square().sum()))


INT8_LEVELS = 127
SCREEN_BUILD_ROWS = 1 << 14  # rows converted at a time while building a screen (float64: ~50 MB per temporary at dim 384)


@dataclass(frozen=True, eq=False)
class Int8Screen:
    """An int8 copy of float16 tokens for a fast approximate MaxSim pass with a proven error:
    codes = round(t / scale) with one scale per dimension (the largest |value| of that dimension
    over the version / 127), so that int8 x int8 -> int32 products, exact, rank tokens without
    any per-row rescaling (max over tokens commutes with the query's positive scale).

    t = scale * codes + e exactly (float64), and for each document the largest |e| and |codes|
    (L2 over the token's dims) among its tokens are kept: they bound the pass's error for that
    document (`colgrid_server.search._maxsim.int8_screen_scores`)."""

    codes: torch.Tensor  # int8 (N_tok, dim)
    scale: np.ndarray  # float64 (dim,), positive
    doc_error: np.ndarray  # float64 (N_doc,): max over the document's tokens of |t - scale * codes|
    doc_code_norm: np.ndarray  # float64 (N_doc,): max over the document's tokens of |codes|

    @classmethod
    def build(cls, tokens: torch.Tensor, doc_offsets: np.ndarray) -> Int8Screen:
        """From float16 (N_tok, dim) CPU tokens and the version's CSR offsets (every document
        holds at least one token)."""
        n_tok, dim = tokens.shape
        absmax = np.zeros(dim, dtype=np.float64)
        for start in range(0, n_tok, SCREEN_BUILD_ROWS):
            block = tokens[start : start + SCREEN_BUILD_ROWS].to(torch.float32).abs().amax(dim=0)
            absmax = np.maximum(absmax, block.numpy().astype(np.float64))
        # An all-zero dimension still needs a positive scale; its codes are all zero anyway.
        scale = np.where(absmax > 0, absmax / INT8_LEVELS, 1.0)
        codes = torch.empty((n_tok, dim), dtype=torch.int8)
        error, code_norm = np.empty(n_tok), np.empty(n_tok)
        for start in range(0, n_tok, SCREEN_BUILD_ROWS):
            values = tokens[start : start + SCREEN_BUILD_ROWS].numpy().astype(np.float64)
            q = np.clip(np.rint(values / scale), -INT8_LEVELS, INT8_LEVELS)
            stop = start + values.shape[0]
            codes[start:stop] = torch.from_numpy(q.astype(np.int8))
            error[start:stop] = np.linalg.norm(values - q * scale, axis=1)
            code_norm[start:stop] = np.linalg.norm(q, axis=1)
        starts = np.asarray(doc_offsets[:-1], dtype=np.int64)
        # Rounding of the float64 norms themselves (a few ulps) is covered by 1e-12 relative.
        return cls(
            codes=codes,
            scale=scale,
            doc_error=np.maximum.reduceat(error, starts) * (1 + 1e-12) if n_tok else np.zeros(0),
            doc_code_norm=np.maximum.reduceat(code_norm, starts) * (1 + 1e-12) if n_tok else np.zeros(0),
        )

    @property
    def nbytes(self) -> int:
        return self.codes.nelement() + self.scale.nbytes + self.doc_error.nbytes + self.doc_code_norm.nbytes
