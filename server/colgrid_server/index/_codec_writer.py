"""Writing a version's token payload with its codec, during the writer's one pass over the
staged float16 tokens (after the centroids exist: residual codecs need them)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from colgrid_server.index import _format as F
from colgrid_server.index._codecs import Codec, ResidualBuckets, fit_residual_buckets, int8_encode, packed_width, residual_encode
from colgrid_server.index._zarr_io import CHUNK_BYTES, Appender, pow2_rows

CreateArray = Callable[..., zarr.Array]  # (name, shape, dtype, chunks, **kwargs) -> zarr.Array


class CodecWriter:
    """fp16 keeps the staged array as it is; int8 and residual codecs write their own arrays
    (the writer then drops the staged copy)."""

    def __init__(self, codec: Codec, dim: int, create: CreateArray, *, renormalize: bool) -> None:
        self.codec, self.dim, self._create = codec, dim, create
        self.renormalize = renormalize
        self._buckets: ResidualBuckets | None = None
        self._appenders: list[Appender] = []
        if codec.name == "int8":
            rows = pow2_rows(CHUNK_BYTES // dim)
            self._q = self._appender(F.TOKENS_INT8, (0, dim), "int8", (rows, dim))
            self._scales = self._appender(F.TOKEN_SCALES, (0,), "float32", (pow2_rows(CHUNK_BYTES // 4),))
        elif codec.is_residual:
            width = packed_width(dim, codec.nbits)
            self._packed = self._appender(F.RESIDUALS, (0, width), "uint8", (pow2_rows(CHUNK_BYTES // width), width))

    @property
    def needs_fit(self) -> bool:
        return self.codec.is_residual

    def fit(self, sample: np.ndarray, sample_codes: np.ndarray, centroids: np.ndarray) -> None:
        """Residual buckets from a token sample (float32) and its centroid codes."""
        self._buckets = fit_residual_buckets(sample - centroids[sample_codes], self.codec.nbits)

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

    def finish(self) -> dict[str, Any]:
        """Flush, write the codec's small arrays; the codec's entry for zarr.json."""
        for appender in self._appenders:
            appender.flush()
        if self.codec.name == "int8":
            return {"name": "int8", "scale": "per-token"}
        if self.codec.is_residual:
            assert self._buckets is not None
            for name, values in ((F.RESIDUAL_CUTOFFS, self._buckets.cutoffs), (F.RESIDUAL_WEIGHTS, self._buckets.weights)):
                self._create(name, values.shape, values.dtype, values.shape, compressors=None)[...] = values
            return {"name": self.codec.name, "nbits": self.codec.nbits, "renormalize": self.renormalize}
        return {"name": "fp16"}

    def _appender(self, name: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> Appender:
        appender = Appender(self._create(name, shape, dtype, chunks, compressors=None))
        self._appenders.append(appender)
        return appender
