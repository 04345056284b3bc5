"""Token stores: a loaded version's token vectors in the layout the MaxSim kernel reads.

`gather(rows)` returns the float32 vectors of the given token rows; the kernel never needs to
know the codec. DenseTokens holds float16 values (an fp16 version, or a compressed one decoded
at load). Int8Tokens and ResidualTokens keep the codes resident and decode only the rows a
query scores: several times less memory, at the cost of decoding per query.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

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
    """float16 values: exact float32 after conversion."""

    def __init__(self, tokens: torch.Tensor, *, codec: str, max_norm: float) -> None:
        self.tokens = tokens
        self.codec = codec
        self.rows, self.dim = tokens.shape
        self.device = tokens.device
        self.max_norm = max_norm

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tokens.index_select(0, rows).to(torch.float32)

    def decode(self, start: int, stop: int) -> torch.Tensor:
        return self.tokens[start:stop].to(torch.float32)

    @property
    def nbytes(self) -> int:
        return self.tokens.element_size() * self.tokens.nelement()

    def close(self) -> None:
        self.tokens = torch.empty((0, self.dim), dtype=torch.float16)


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
