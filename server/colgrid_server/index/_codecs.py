"""Token codecs: how a version stores its token vectors (DESIGN.md "Index versions").

- fp16: the vectors rounded to float16 (2 * dim bytes per token).
- int8: symmetric per-token quantisation, token = q * scale, q in [-127, 127] (dim + 4 bytes).
- residual4 / residual2 (PLAID-style): token = centroid[code] + residual, each residual
  coordinate replaced by one of 2^nbits bucket values of its dimension (dim * nbits / 8 bytes;
  the centroid code is the token_codes array every version has). Buckets come from the
  residuals of a token sample: per-dimension quantiles refined by a few Lloyd-Max iterations,
  which lowers the squared error against ColBERTv2's single set of quantiles for all dimensions.
  Versions of unit vectors re-normalise decoded tokens, as ColBERTv2 does.

- entropy4 / entropy2: the residual rotated, weighted and entropy-coded at a budget of 4 / 2
  bits per dimension on average (_entropy.py); decoded at load.

Decoding is vectorised torch (the same functions serve whole chunks at load time and a query's
candidate rows), so a decoded token is the same float32 vector whichever path produced it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from colgrid_server.errors import InvalidArgument
from colgrid_server.index._format import CODECS, DEFAULT_CODEC

INT8_MAX = 127
LLOYD_ITERATIONS = 8
RESIDUAL_FIT_SAMPLE = 32768  # tokens whose residuals set the buckets


@dataclass(frozen=True)
class Codec:
    name: str
    nbits: int = 0  # bits per dimension of a residual codec (a budget for entropy codecs); 0 otherwise

    @property
    def is_residual(self) -> bool:
        """Fixed-width buckets per dimension (residual4, residual2)."""
        return self.name.startswith("residual")

    @property
    def is_entropy(self) -> bool:
        return self.name.startswith("entropy")

    def payload_bytes_per_token(self, dim: int) -> int:
        """Bytes of the token payload per token (not counting token_codes, which every codec has)."""
        if self.name == "fp16":
            return 2 * dim
        if self.name == "int8":
            return dim + 4
        if self.is_entropy:  # a budget: the stored size is measured, within it
            return dim * self.nbits // 8
        return packed_width(dim, self.nbits)


def resolve_codec(build_params: Mapping[str, Any]) -> Codec:
    name = build_params.get("codec", DEFAULT_CODEC)
    if name not in CODECS:
        raise InvalidArgument(
            f"build parameter codec must be one of {', '.join(CODECS)}, got {name!r}", field="build_params.codec"
        )
    for family in ("residual", "entropy"):
        if name.startswith(family):
            return Codec(name=name, nbits=int(name[len(family) :]))
    return Codec(name=name)


def packed_width(dim: int, nbits: int) -> int:
    return -(-dim * nbits // 8)


# -- int8 ------------------------------------------------------------------------------------


def int8_encode(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (n, dim), scale float32 (n,)) with block ~= q * scale[:, None]."""
    wide = block.astype(np.float32)
    scale = np.abs(wide).max(axis=1) / INT8_MAX
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # a zero vector stays zero
    q = np.clip(np.rint(wide / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def int8_decode(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale[:, None]


# -- residual ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualBuckets:
    """Per dimension: cutoffs (dim, B - 1) ascending, bucket values (dim, B), B = 2^nbits."""

    nbits: int
    cutoffs: np.ndarray
    weights: np.ndarray


def fit_residual_buckets(residuals: np.ndarray, nbits: int) -> ResidualBuckets:
    """Buckets minimising the squared error of each dimension's residuals (S, dim): quantile
    start, then Lloyd-Max (value = mean of its bucket, cutoff = midpoint of adjacent values)."""
    n_buckets = 1 << nbits
    r = torch.from_numpy(np.ascontiguousarray(residuals, dtype=np.float32))
    dim = r.shape[1]
    quantiles = torch.arange(n_buckets, dtype=torch.float64).add_(0.5).div_(n_buckets)
    weights = torch.from_numpy(np.quantile(residuals.astype(np.float64), quantiles.numpy(), axis=0).T.copy())
    r_t = r.T.contiguous().to(torch.float64)  # (dim, S)
    flat_base = torch.arange(dim, dtype=torch.int64)[:, None] * n_buckets
    for _ in range(LLOYD_ITERATIONS):
        cutoffs = (weights[:, 1:] + weights[:, :-1]) / 2
        buckets = torch.searchsorted(cutoffs.contiguous(), r_t) + flat_base  # (dim, S) flat bucket ids
        sums = torch.zeros(dim * n_buckets, dtype=torch.float64).index_add_(0, buckets.view(-1), r_t.reshape(-1))
        counts = torch.bincount(buckets.view(-1), minlength=dim * n_buckets).to(torch.float64)
        filled = counts > 0  # an empty bucket keeps its value
        flat = weights.reshape(-1).clone()
        flat[filled] = sums[filled] / counts[filled]
        weights = flat.view(dim, n_buckets).sort(dim=1).values
    cutoffs = (weights[:, 1:] + weights[:, :-1]) / 2
    return ResidualBuckets(nbits=nbits, cutoffs=cutoffs.to(torch.float32).numpy(), weights=weights.to(torch.float32).numpy())


def residual_encode(block: np.ndarray, codes: np.ndarray, centroids: np.ndarray, buckets: ResidualBuckets) -> np.ndarray:
    """Packed bucket indices (n, packed_width) uint8 of block - centroids[codes]; dimension
    j * per_byte + i of a byte's group sits in bits [i * nbits, (i + 1) * nbits)."""
    residual = torch.from_numpy(block.astype(np.float32) - centroids[codes])
    index = torch.searchsorted(torch.from_numpy(buckets.cutoffs), residual.T.contiguous()).T  # (n, dim)
    return _pack(index.to(torch.uint8).numpy(), buckets.nbits)


def _pack(index: np.ndarray, nbits: int) -> np.ndarray:
    n, dim = index.shape
    per_byte = 8 // nbits
    width = packed_width(dim, nbits)
    padded = np.zeros((n, width * per_byte), dtype=np.uint8)
    padded[:, :dim] = index
    groups = padded.reshape(n, width, per_byte)
    packed = np.zeros((n, width), dtype=np.uint8)
    for i in range(per_byte):
        packed |= groups[:, :, i] << np.uint8(i * nbits)
    return packed


def residual_table(buckets: ResidualBuckets, dim: int) -> torch.Tensor:
    """(width * 256, per_byte) float32: row p * 256 + v holds the residual values of the dims
    stored in byte p when it has value v (padding dims decode to 0), so decoding is one
    embedding lookup per byte instead of shifts and a lookup per dimension."""
    nbits = buckets.nbits
    per_byte = 8 // nbits
    width = packed_width(dim, nbits)
    weights = np.zeros((width * per_byte, 1 << nbits), dtype=np.float32)
    weights[:dim] = buckets.weights
    values = np.arange(256)
    index = np.stack([(values >> (i * nbits)) & ((1 << nbits) - 1) for i in range(per_byte)], axis=1)  # (256, per_byte)
    dims = np.arange(width)[:, None, None] * per_byte + np.arange(per_byte)[None, None, :]  # (width, 1, per_byte)
    table = weights[dims, index[None, :, :]]  # (width, 256, per_byte)
    return torch.from_numpy(np.ascontiguousarray(table.reshape(width * 256, per_byte)))


def residual_decode(
    packed: torch.Tensor,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    table: torch.Tensor,
    dim: int,
    renormalize: bool,
) -> torch.Tensor:
    """float32 (n, dim) tokens from packed residuals (n, width) uint8 and centroid codes (n,)."""
    n, width = packed.shape
    if packed.device.type == "cpu":
        # numpy's take is ~7x faster than torch's embedding lookup for rows of 2-4 floats.
        rows = packed.numpy().astype(np.intp)  # take's own index type: no conversion inside
        rows += np.arange(0, width * 256, 256, dtype=np.intp)
        residual = torch.from_numpy(np.take(table.numpy(), rows.reshape(-1), axis=0).reshape(n, -1))
    else:
        rows_t = packed.to(torch.int64) + torch.arange(0, width * 256, 256, device=packed.device)
        residual = torch.nn.functional.embedding(rows_t, table).view(n, -1)
    # In place: a fresh (n, dim) float32 buffer per step costs more than the arithmetic (page faults).
    out = residual[:, :dim] if residual.shape[1] != dim else residual
    out = out.contiguous().add_(centroids.index_select(0, codes.to(torch.int64)))
    if renormalize:
        out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min_(1e-12))
    return out
