"""What a search returns: hits with optional explanations, and timings."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PatchRef:
    """One patch of an image document: its (row, col) in the patch grid and its pixel box
    (x0, y0, x1, y1, end-exclusive) on the page image."""

    row: int
    col: int
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TokenMatch:
    """How one query token was matched inside one hit: its best document token (the document
    text[start:end]; empty with start = end = -1 for a token with no span), their similarity
    (this token's contribution to the score) and share = similarity / score."""

    query_index: int
    query_token: str
    doc_token_index: int
    doc_token: str
    start: int
    end: int
    similarity: float
    share: float
    # Image documents: the patch the matched vector stands for (the nearest one of a pooled
    # vector's patches) and the pooled vector's other patches.
    patch: PatchRef | None = None
    pooled: tuple[PatchRef, ...] = ()


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    rank: int  # 1-based
    metadata: Mapping[str, Any] = field(default_factory=dict)
    explanation: tuple[TokenMatch, ...] = ()
    kind: str = "text"  # "text" or "image"


@dataclass(frozen=True)
class SearchStats:
    candidates_ms: float
    maxsim_ms: float
    candidates: int  # documents scored exactly
    query_tokens: int


@dataclass(frozen=True)
class SearchResult:
    hits: tuple[Hit, ...]
    stats: SearchStats
