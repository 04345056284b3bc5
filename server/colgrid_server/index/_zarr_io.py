"""Zarr writing helpers shared by the writer and the codecs: chunk sizing and an appender that
writes each chunk once."""
from __future__ import annotations

import math

import numpy as np
import zarr

CHUNK_BYTES = 4 << 20  # target uncompressed chunk size
WRITE_CONFIG = {"write_empty_chunks": True}  # every chunk on disk: a missing one is corruption


class Appender:
    """Buffers rows and appends them to a resizable Zarr array a whole chunk at a time, so each
    chunk is written once and the corpus is never held in memory."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self._rows = array.chunks[0]
        self._parts: list[np.ndarray] = []
        self._buffered = 0

    def append(self, values: np.ndarray) -> None:
        self._parts.append(values)
        self._buffered += values.shape[0]
        if self._buffered >= self._rows:
            self._write(whole_chunks_only=True)

    def flush(self) -> None:
        if self._buffered:
            self._write(whole_chunks_only=False)

    def _write(self, *, whole_chunks_only: bool) -> None:
        data = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        n = (data.shape[0] // self._rows) * self._rows if whole_chunks_only else data.shape[0]
        start = self.array.shape[0]
        self.array.resize((start + n,) + self.array.shape[1:])
        self.array[start : start + n] = data[:n]
        rest = data[n:]
        self._parts = [rest] if rest.shape[0] else []
        self._buffered = rest.shape[0]


def pow2_rows(rows: int) -> int:
    return 2 ** max(0, int(math.floor(math.log2(max(1, rows)))))
