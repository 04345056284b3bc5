"""Per-request search knobs, validated once."""
from __future__ import annotations

from dataclasses import dataclass

from colgrid_server.errors import InvalidArgument

DEFAULT_K = 10
MAX_K = 1000
# Defaults measured on 5,000 stdlib docstrings (MiniLM, 272k tokens, C = 8192), queries of 10-17
# tokens: recall@10 against exhaustive 0.995 at (nprobe 4, 128 candidates); 0.976 at (2, 64).
DEFAULT_NPROBE = 4
MAX_NPROBE = 1024
DEFAULT_N_CANDIDATES = 128
CANDIDATES_PER_HIT = 4  # an unset n_candidates is max(DEFAULT_N_CANDIDATES, 4 k)
MAX_N_CANDIDATES = 1_000_000


@dataclass(frozen=True)
class SearchParams:
    """k: hits returned. nprobe: centroids probed per query token. n_candidates: documents scored
    exactly (after pruning the inverted lists' union with approximate centroid scores); never
    fewer than k; None means max(DEFAULT_N_CANDIDATES, 4 k). explain: attach per-query-token
    matches to each hit."""

    k: int = DEFAULT_K
    nprobe: int = DEFAULT_NPROBE
    n_candidates: int | None = None  # an int once constructed (None resolves from k)
    explain: bool = False

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1, MAX_K)
        if self.n_candidates is None:
            object.__setattr__(self, "n_candidates", max(DEFAULT_N_CANDIDATES, CANDIDATES_PER_HIT * self.k))
        _check_int("nprobe", self.nprobe, 1, MAX_NPROBE)
        _check_int("n_candidates", self.n_candidates, 1, MAX_N_CANDIDATES)
        if self.n_candidates < self.k:
            raise InvalidArgument(
                f"n_candidates ({self.n_candidates}) must be at least k ({self.k}): every hit is scored exactly",
                field="n_candidates",
            )
        if not isinstance(self.explain, bool):
            raise InvalidArgument("explain must be a boolean", field="explain")

    @classmethod
    def from_request(
        cls,
        k: int | None = None,
        nprobe: int | None = None,
        n_candidates: int | None = None,
        explain: bool = False,
    ) -> SearchParams:
        """Knobs as they arrive on the wire: None (unset) means the default; a set value must be
        valid (0 included: it is an error, not a default)."""
        return cls(
            k=DEFAULT_K if k is None else k,
            nprobe=DEFAULT_NPROBE if nprobe is None else nprobe,
            n_candidates=n_candidates,
            explain=bool(explain),
        )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}", field=name)
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low} and {high}, got {value}", field=name)
