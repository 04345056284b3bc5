"""Writing a version's token payload with its codec, during the writer's one pass over the
staged float16 tokens (after the centroids exist: residual codecs need them)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from colgrid_server.index import _format as F
from colgrid_server.index._codecs import Codec, ResidualBuckets, fit_residual_buckets, int8_encode, packed_width, residual_encode
from colgrid_server.index._entropy import BLOCK_ROWS, ESCAPE_QUOTIENT, EntropyModel, encode_block, fit_entropy_model, fixed_bytes
from colgrid_server.index._zarr_io import CHUNK_BYTES, Appender, pow2_rows

UNARY_CHUNK_BLOCKS = 32  # blocks per chunk of entropy_unary_lengths (one row per block)
CreateArray = Callable[..., zarr.Array]  # (name, shape, dtype, chunks, **kwargs) -> zarr.Array


class CodecWriter:
    """fp16 keeps the staged array as it is; int8 and residual codecs write their own arrays
    (the writer then drops the staged copy)."""

    def __init__(self, codec: Codec, dim: int, create: CreateArray, *, renormalize: bool) -> None:
        self.codec, self.dim, self._create = codec, dim, create
        self.renormalize = renormalize
        self._buckets: ResidualBuckets | None = None
        self._entropy: EntropyModel | None = None
        self._appenders: list[Appender] = []
        if codec.name == "int8":
            rows = pow2_rows(CHUNK_BYTES // dim)
            self._q = self._appender(F.TOKENS_INT8, (0, dim), "int8", (rows, dim))
            self._scales = self._appender(F.TOKEN_SCALES, (0,), "float32", (pow2_rows(CHUNK_BYTES // 4),))
        elif codec.is_residual:
            width = packed_width(dim, codec.nbits)
            # zstd stores the packed codes raw; only the last chunk's zero padding shrinks.
            self._packed = self._appender(F.RESIDUALS, (0, width), "uint8", (pow2_rows(CHUNK_BYTES // width), width), compress=True)
        elif codec.is_entropy:
            # Zarr's default zstd: the coded bytes do not compress (zstd stores them raw at
            # memcpy speed), but the zero padding of each array's last chunk then takes no space.
            self._bytes = self._appender(F.ENTROPY_BYTES, (0,), "uint8", (CHUNK_BYTES,), compress=True)
            self._unary = self._appender(F.ENTROPY_UNARY_LENGTHS, (0, dim), "uint32", (UNARY_CHUNK_BLOCKS, dim), compress=True)
            self._block_offsets = [0]
            self._pending: list[np.ndarray] = []  # residuals not yet coded (less than a block)
            self._pending_rows = 0

    @property
    def needs_fit(self) -> bool:
        return self.codec.is_residual or self.codec.is_entropy

    def fit(self, sample: np.ndarray, sample_codes: np.ndarray, centroids: np.ndarray, *, total_tokens: int) -> None:
        """Residual buckets (or the entropy model) from a token sample (float32) and its centroid
        codes. The entropy model's size estimate needs tokens the centroids were not fitted on;
        its budget covers every entropy array, the last chunk's padding included."""
        residuals = sample - centroids[sample_codes]
        if self.codec.is_entropy:
            fixed = fixed_bytes(self.dim)
            self._entropy = fit_entropy_model(residuals, self.codec.nbits, total_tokens=total_tokens, fixed_bytes=fixed)
        else:
            self._buckets = fit_residual_buckets(residuals, self.codec.nbits)

    def encode(self, block: np.ndarray, codes: np.ndarray, centroids: np.ndarray) -> None:
        """Append the payload of consecutive staged tokens (float16) with their centroid codes."""
        if self.codec.name == "int8":
            q, scale = int8_encode(block)
            self._q.append(q)
            self._scales.append(scale)
        elif self.codec.is_residual:
            if self._buckets is None:
                raise RuntimeError("residual codec used before fit()")
            self._packed.append(residual_encode(block, codes, centroids, self._buckets))
        elif self.codec.is_entropy:
            self._pending.append(block.astype(np.float32) - centroids[codes])
            self._pending_rows += block.shape[0]
            if self._pending_rows >= BLOCK_ROWS:
                self._code_pending(whole_blocks_only=True)

    def _code_pending(self, *, whole_blocks_only: bool) -> None:
        if self._entropy is None:
            raise RuntimeError("entropy codec used before fit()")
        residuals = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = (residuals.shape[0] // BLOCK_ROWS) * BLOCK_ROWS if whole_blocks_only else residuals.shape[0]
        for start in range(0, n, BLOCK_ROWS):
            data, unary = encode_block(residuals[start : min(n, start + BLOCK_ROWS)], self._entropy)
            self._bytes.append(data)
            self._unary.append(unary[None, :])
            self._block_offsets.append(self._block_offsets[-1] + data.shape[0])
        rest = residuals[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]

    def finish(self) -> dict[str, Any]:
        """Flush, write the codec's small arrays; the codec's entry for zarr.json."""
        if self.codec.is_entropy and self._pending_rows:
            self._code_pending(whole_blocks_only=False)
        for appender in self._appenders:
            appender.flush()
        if self.codec.name == "int8":
            return {"name": "int8", "scale": "per-token"}
        if self.codec.is_residual:
            assert self._buckets is not None
            for name, values in ((F.RESIDUAL_CUTOFFS, self._buckets.cutoffs), (F.RESIDUAL_WEIGHTS, self._buckets.weights)):
                self._create(name, values.shape, values.dtype, values.shape, compressors=None)[...] = values
            return {"name": self.codec.name, "nbits": self.codec.nbits, "renormalize": self.renormalize}
        if self.codec.is_entropy:
            assert self._entropy is not None
            offsets = np.asarray(self._block_offsets, dtype=np.int64)
            model = self._entropy
            for name, values in ((F.ENTROPY_BLOCK_OFFSETS, offsets), (F.ENTROPY_ROTATION, model.rotation),
                                 (F.ENTROPY_SCALES, model.scale), (F.ENTROPY_RICE_K, model.rice_k)):  # fmt: skip
                self._create(name, values.shape, values.dtype, values.shape, compressors=None)[...] = values
            return {"name": self.codec.name, "nbits": self.codec.nbits, "renormalize": self.renormalize,
                    "step": model.step, "block_rows": BLOCK_ROWS, "escape_quotient": ESCAPE_QUOTIENT}  # fmt: skip
        return {"name": "fp16"}

    def _appender(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...], *, compress: bool = False) -> Appender:
        # Uncompressed unless asked: codes are incompressible, and compressing costs load time.
        appender = Appender(self._create(name, shape, dtype, chunks, **({} if compress else {"compressors": None})))
        self._appenders.append(appender)
        return appender
