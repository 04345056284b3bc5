"""What an encoder returns: one multi-vector per input text, with token strings and spans."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncodedText:
    """vectors: float32 (n_tokens, dim), L2-normalised rows. tokens: display string per row.
    spans: int32 (n_tokens, 2) character offsets [start, end) into the original text
    (-1, -1 for rows with no span, e.g. query augmentation tokens)."""

    vectors: np.ndarray
    tokens: list[str]
    spans: np.ndarray

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if self.vectors.ndim != 2 or len(self.tokens) != n or self.spans.shape != (n, 2):
            raise ValueError("EncodedText: vectors, tokens and spans must have one row per token")


@dataclass(frozen=True)
class EncodedImage:
    """One image's multi-vector, one row per (merged) patch, rows in row-major grid order.

    vectors: float32 (n, dim), L2-normalised. patches: int32 (n, 2), each row's (row, col) in the
    patch grid. grid: (rows, cols) of that grid, rows * cols == n. boxes: int32 (n, 4), each
    patch's pixel box (x0, y0, x1, y1) on the ORIGINAL image, end-exclusive; the boxes tile the
    image. size: (width, height) of the original image.
    """

    vectors: np.ndarray
    patches: np.ndarray
    grid: tuple[int, int]
    boxes: np.ndarray
    size: tuple[int, int]

    def __post_init__(self) -> None:
        n = self.vectors.shape[0]
        if self.vectors.ndim != 2 or self.patches.shape != (n, 2) or self.boxes.shape != (n, 4) \
                or self.grid[0] * self.grid[1] != n:
            raise ValueError("EncodedImage: vectors, patches and boxes must have one row per grid cell")
