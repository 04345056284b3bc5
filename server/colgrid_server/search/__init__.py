"""Search over one loaded index version: candidates from centroids and inverted lists, exact
MaxSim on them, top-k with explanations (DESIGN.md "Candidate generation and exact MaxSim")."""
from __future__ import annotations

from colgrid_server.search._explain import (
    DEFAULT_ALPHA,
    DocumentExplanation,
    check_alpha,
    explain_document,
    find_document,
    render_explanation_png,
)
from colgrid_server.search._filters import DocumentFilter, FieldCondition, parse_filter
from colgrid_server.search._maxsim import (
    DEFAULT_BLOCK_TOKENS,
    Explanation,
    bf16_error_bound,
    maxsim_explain,
    maxsim_scores,
)
from colgrid_server.search._params import (
    CANDIDATES_PER_HIT,
    DEFAULT_K,
    DEFAULT_N_CANDIDATES,
    DEFAULT_NPROBE,
    MAX_K,
    MAX_N_CANDIDATES,
    MAX_NPROBE,
    SearchParams,
)
from colgrid_server.search._results import Hit, PatchRef, SearchResult, SearchStats, TokenMatch
from colgrid_server.search._searcher import Searcher

__all__ = [
    "DEFAULT_ALPHA",
    "DocumentExplanation",
    "DocumentFilter",
    "FieldCondition",
    "parse_filter",
    "check_alpha",
    "explain_document",
    "find_document",
    "render_explanation_png",
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_K",
    "DEFAULT_NPROBE",
    "CANDIDATES_PER_HIT",
    "DEFAULT_N_CANDIDATES",
    "MAX_K",
    "MAX_NPROBE",
    "MAX_N_CANDIDATES",
    "Explanation",
    "Hit",
    "PatchRef",
    "SearchParams",
    "SearchResult",
    "SearchStats",
    "Searcher",
    "TokenMatch",
    "bf16_error_bound",
    "maxsim_explain",
    "maxsim_scores",
]
