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
