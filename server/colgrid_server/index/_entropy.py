"""entropy4 / entropy2 codecs: rotated, weighted, entropy-coded residuals.

token = centroid[code] + U (s * step / w), s an integer per (token, rotated dimension):

- U: eigenvectors of the weighting W = E[r r^T] + (tr E[r r^T] / dim) I, r the residuals
  (token - centroid) of the fit sample, eigenvalues lambda. A residual error e changes a query
  token's similarity by q.e, and what moves a document's score is that change at the document
  token the query token matches best, which lies close to it: after re-normalisation the error
  along that token mostly vanishes, and q.e is read by the query token's deviation from it,
  which spreads like tokens around their centroid (the residuals), not like tokens in general
  (whose second moment E[t t^T] is dominated by their shared mean direction). The isotropic
  part (one mean eigenvalue) keeps every direction's weight within sqrt(dim + 1) of the others:
  queries vary more than document tokens in the directions the residuals barely use. On 20k
  MiniLM docstrings, at equal bytes, this cuts the RMS error of the MaxSim scores of each
  query's fp16 top-20 documents by 30% against E[t t^T] (the residuals' moment alone: 15%;
  the isotropic part alone: 30%, with a larger error per query token). Recall moves less,
  because the loss is mostly near-ties at rank 10: on 700 held-out queries the exhaustive
  recall@10 loss fell from 0.0090 to 0.0075 and the default search's from 0.0066 to 0.0058
  (means of four encodings each; one encoding to the next varies by ~0.001).
- w = sqrt(lambda): one uniform step in the coordinates (U^T r) * w then weighs each direction by
  what it costs. With entropy coding, a single step for every coordinate is the allocation that
  minimises that weighted squared error at a given rate (reverse water-filling at high rate),
  where fixed-width buckets (residual4) must give every dimension a whole number of bits.
- The integers are Rice-coded per dimension (parameter k per dimension), per block of
  BLOCK_ROWS tokens: a byte-aligned stream of unary quotients per dimension, then a stream of
  k-bit remainders per dimension, then the escaped values (quotients of ESCAPE_QUOTIENT or more,
  stored whole as int64). Rice coding lands within ~2.5% of the entropy of these integers here,
  and both encoding and decoding are vectorised numpy (no Python loop per token).
- step is chosen on held-out fit tokens so that the estimated size meets the budget
  (nbits * dim bits per token, with a margin).

Versions written with the earlier weighting E[t t^T] decode unchanged: the rotation and scales
are stored with every version, so the weighting is the encoder's choice alone.

Blocks decode only whole, so these versions always decode at load (no codes-resident layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 16384  # tokens per coded block: ~100 MB of scratch to decode one at dim 384
ESCAPE_QUOTIENT = 40  # a unary quotient this long marks a value stored whole in the escape stream
SIZE_MARGIN = 0.005  # fraction of the budget kept back: the fit sample only estimates the size
MAX_RICE_K = 40
SYMBOL_LIMIT = float(1 << 40)  # integers are clipped here: far beyond what float32 resolves
EIGEN_FLOOR = 1e-6  # eigenvalues below this fraction of the largest count as this (no 1/0 weights)
ISOTROPIC_SHARE = 1.0  # the weighting's isotropic part, in mean eigenvalues of the residuals' second moment
ARRAY_METADATA_BYTES = 6 * 1024  # the six entropy arrays' zarr.json files


@dataclass(frozen=True)
class EntropyModel:
    """rotation (dim, dim) float32 (columns: eigenvectors, descending eigenvalue), scale (dim,)
    float32 positive (sqrt of the eigenvalues), step > 0, rice_k (dim,) uint8."""

    rotation: np.ndarray
    scale: np.ndarray
    step: float
    rice_k: np.ndarray
    escape_quotient: int = ESCAPE_QUOTIENT

    @property
    def dim(self) -> int:
        return int(self.scale.shape[0])

    def symbols(self, residuals: np.ndarray) -> np.ndarray:
        """int64 (n, dim) integers of residuals (n, dim)."""
        z = (residuals.astype(np.float32) @ self.rotation) * (self.scale / np.float32(self.step))
        # Far beyond what float32 resolves anyway; keeps a wild input from overflowing int64.
        return np.rint(np.clip(z, -SYMBOL_LIMIT, SYMBOL_LIMIT)).astype(np.int64)

    def residuals(self, symbols: np.ndarray) -> np.ndarray:
        """float32 (n, dim) residuals of integers (n, dim)."""
        z = symbols.astype(np.float32) * (np.float32(self.step) / self.scale)
        return z @ self.rotation.T


def fit_entropy_model(residuals: np.ndarray, nbits: int, *, total_tokens: int, fixed_bytes: int) -> EntropyModel:
    """The model for a budget of nbits bits per dimension over total_tokens tokens, fixed_bytes
    of it taken by arrays of fixed size (the model's own, padding), from a sample of residuals
    (S, dim) (token - centroid). The first half sets the rotation, the second the step and
    Rice parameters (a step fitted on the residuals that set the rotation would underestimate
    the size)."""
    # Shuffled before the halves are cut: a sample drawn in corpus order would set the step
    # on the corpus' second half only (on 20k docstrings, its tokens cost 4% fewer bits).
    shuffle = np.random.default_rng(0).permutation(np.shape(residuals)[0])
    residuals = np.asarray(residuals, dtype=np.float32)[shuffle]
    n, dim = residuals.shape
    half = n // 2 if n >= 64 else n
    first = residuals[:half].astype(np.float64)
    second = first.T @ first / max(1, half)
    weighting = second + ISOTROPIC_SHARE * float(np.trace(second)) / dim * np.eye(dim)
    eigenvalues, vectors = np.linalg.eigh(weighting)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    floor = max(float(eigenvalues[0]), 1e-30) * EIGEN_FLOOR
    scale = np.sqrt(np.maximum(eigenvalues, floor)).astype(np.float32)
    rotation = np.ascontiguousarray(vectors, dtype=np.float32)
    held_out = residuals[half:] if n - half > 0 else residuals
    z = (held_out @ rotation) * scale
    budget = nbits * dim * (1 - SIZE_MARGIN) - _overhead_bits_per_token(dim) - 8 * fixed_bytes / max(1, total_tokens)
    budget = max(budget, float(dim))  # a version too small to amortise the fixed arrays: 1 bit per value
    step = _step_for_budget(z, budget)
    k = np.array([_best_k(_zigzag(np.rint(z[:, j] / step).astype(np.int64))) for j in range(dim)], dtype=np.uint8)
    return EntropyModel(rotation=rotation, scale=scale, step=step, rice_k=k)


def fixed_bytes(dim: int) -> int:
    """Bytes of a version's entropy arrays that do not grow with its tokens: rotation, scales,
    Rice parameters, one int64 offset, and the arrays' zarr.json files (~0.7 KB each)."""
    return 4 * dim * dim + 4 * dim + dim + 8 + ARRAY_METADATA_BYTES


def _overhead_bits_per_token(dim: int) -> float:
    # Per block: a uint32 unary length per dimension and an int64 block offset; byte padding
    # of 2 * dim streams (4 bits each on average).
    return (dim * 32 + 64 + 2 * dim * 4) / BLOCK_ROWS


def _step_for_budget(z: np.ndarray, budget_bits: float) -> float:
    """The smallest step (bisection on its logarithm) whose estimated Rice size per token is
    within budget_bits."""
    largest = float(np.abs(z).max()) if z.size else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 1.0
    lo, hi = math.log(largest * 1e-9), math.log(largest * 4)  # at hi every integer is 0
    for _ in range(48):
        mid = (lo + hi) / 2
        if estimated_bits_per_token(z, math.exp(mid)) > budget_bits:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def estimated_bits_per_token(z: np.ndarray, step: float) -> float:
    """Rice size per token (best k per dimension) of the integers of z at step, escapes included."""
    u = _zigzag(np.rint(z / step).astype(np.int64))
    return float(sum(_rice_bits(u[:, j], _best_k(u[:, j])) for j in range(u.shape[1])) / max(1, u.shape[0]))


def _zigzag(s: np.ndarray) -> np.ndarray:
    return np.where(s >= 0, 2 * s, -2 * s - 1)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    return (u >> 1) ^ -(u & 1)


def _rice_bits(u: np.ndarray, k: int) -> int:
    q = u >> k
    escaped = q >= ESCAPE_QUOTIENT
    return int(np.minimum(q, ESCAPE_QUOTIENT).sum()) + u.shape[0] * (1 + k) + 64 * int(escaped.sum())


def _best_k(u: np.ndarray) -> int:
    if u.size == 0:
        return 0
    # Near-optimal k for a geometric-like source is about log2 of the mean; check around it.
    guess = int(math.log2(max(1.0, float(u.mean())))) if u.size else 0
    candidates = range(max(0, guess - 2), min(MAX_RICE_K, guess + 3) + 1)
    return min(candidates, key=lambda k: _rice_bits(u, k))


# -- blocks ------------------------------------------------------------------------------------


def encode_block(residuals: np.ndarray, model: EntropyModel) -> tuple[np.ndarray, np.ndarray]:
    """(bytes uint8, unary_lengths uint32 (dim,)) of residuals (rows, dim)."""
    u = _zigzag(model.symbols(residuals)).T  # (dim, rows)
    dim, rows = u.shape
    k = model.rice_k.astype(np.int64)
    q = u >> k[:, None]
    escaped = q >= model.escape_quotient
    q = np.minimum(q, model.escape_quotient)
    # Unary: per dimension q zeros then a one, each dimension's stream padded to whole bytes.
    unary_bits = q.sum(axis=1) + rows
    unary_bytes = (unary_bits + 7) // 8
    start_bits = 8 * np.concatenate([[0], np.cumsum(unary_bytes)[:-1]])
    ones = start_bits[:, None] + np.cumsum(q + 1, axis=1) - 1
    bits = np.zeros(8 * int(unary_bytes.sum()), dtype=np.uint8)
    bits[ones.ravel()] = 1
    parts = [np.packbits(bits, bitorder="little")]
    # Remainders: k bits per value, per dimension, low bit first.
    remainders = u & ((np.int64(1) << k[:, None]) - 1)
    parts.extend(_pack_fixed(remainders[j], int(k[j])) for j in range(dim))
    parts.append(np.ascontiguousarray(u[escaped].astype("<i8")).view(np.uint8))
    return np.concatenate(parts), unary_bytes.astype(np.uint32)


def decode_block(data: np.ndarray, unary_lengths: np.ndarray, rows: int, model: EntropyModel) -> np.ndarray:
    """float32 (rows, dim) residuals of one block; ValueError if the bytes do not decode to
    exactly rows values per dimension."""
    dim = model.dim
    k = model.rice_k.astype(np.int64)
    lengths = unary_lengths.astype(np.int64)
    unary_end = int(lengths.sum())
    if unary_end > data.shape[0]:
        raise ValueError("unary streams run past the block")
    # As bool: numpy's nonzero has a fast path for bool that is several times quicker than uint8.
    ones = np.flatnonzero(np.unpackbits(data[:unary_end], bitorder="little").view(bool))
    if ones.shape[0] != dim * rows:
        raise ValueError(f"unary streams hold {ones.shape[0]} values, expected {dim * rows}")
    ones = ones.reshape(dim, rows)
    starts = 8 * np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if np.any(ones[:, 0] < starts) or np.any(ones[:, -1] >= starts + 8 * lengths):
        raise ValueError("a unary stream holds a value count other than the block's rows")
    previous = np.concatenate([starts[:, None] - 1, ones[:, :-1]], axis=1)
    q = ones - previous - 1
    fixed_bytes = (rows * k + 7) // 8
    fixed_starts = unary_end + np.concatenate([[0], np.cumsum(fixed_bytes)[:-1]])
    escape_start = unary_end + int(fixed_bytes.sum())
    if escape_start > data.shape[0]:
        raise ValueError("remainder streams run past the block")
    u = q << k[:, None]
    padded = np.concatenate([data[:escape_start], np.zeros(3, np.uint8)]).astype(np.uint32)
    for width in np.unique(k):
        if width == 0:
            continue
        dims = np.flatnonzero(k == width)
        u[dims] |= _unpack_fixed(padded, fixed_starts[dims], rows, int(width))
    escaped = q == model.escape_quotient
    n_escaped = int(escaped.sum())
    if data.shape[0] != escape_start + 8 * n_escaped:
        raise ValueError(f"block holds {data.shape[0]} bytes, expected {escape_start + 8 * n_escaped}")
    if n_escaped:
        u[escaped] = data[escape_start:].view("<i8").astype(np.int64)
    return model.residuals(_unzigzag(u).T)


def _unpack_fixed(padded: np.ndarray, starts: np.ndarray, rows: int, width: int) -> np.ndarray:
    """int64 (len(starts), rows) values of width bits packed low bit first from byte starts[i]
    of padded (uint32 bytes, three zero bytes past the end)."""
    if width > 17:  # wider than a 3-byte window at any bit offset: bit by bit
        index = starts[:, None] * 8 + np.arange(rows * width)
        bits = (padded[index >> 3] >> (index & 7).astype(np.uint32)) & 1
        return (bits.reshape(len(starts), rows, width).astype(np.int64) << np.arange(width, dtype=np.int64)).sum(axis=2)
    offsets = np.arange(rows, dtype=np.int64) * width
    byte = starts[:, None] + (offsets >> 3)[None, :]
    window = padded[byte] | (padded[byte + 1] << 8) | (padded[byte + 2] << 16)
    return ((window >> (offsets & 7).astype(np.uint32)) & np.uint32((1 << width) - 1)).astype(np.int64)


def _pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(0, dtype=np.uint8)
    bits = ((values[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel(), bitorder="little")
