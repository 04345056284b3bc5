"""Domain values the registry hands out: frozen snapshots of rows, never live objects.

Convention for absent values: `None` (an empty rollout pointer, a version's counts and checksum
before it is READY, its storage_uri until someone knows it, `error` unless FAILED), never "".
Timestamps are timezone-aware UTC datetimes.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class VersionState(str, enum.Enum):
    BUILDING = "BUILDING"
    READY = "READY"
    FAILED = "FAILED"
    RETIRED = "RETIRED"

    def __str__(self) -> str:
        return self.value


# The only state changes allowed; everything else is InvalidTransition.
TRANSITIONS: Mapping[VersionState, frozenset[VersionState]] = {
    VersionState.BUILDING: frozenset({VersionState.READY, VersionState.FAILED}),
    VersionState.READY: frozenset({VersionState.RETIRED}),
    VersionState.FAILED: frozenset(),
    VersionState.RETIRED: frozenset(),
}


@dataclass(frozen=True)
class IndexRecord:
    name: str
    created_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    index: str
    version: str
    state: VersionState
    encoder_id: str
    encoder_kind: str
    dim: int
    documents: int | None
    tokens: int | None
    storage_uri: str | None  # always set once READY
    build_params: Mapping[str, Any]  # a fresh dict per read, JSON-serialisable
    manifest_sha256: str | None
    created_at: datetime
    updated_at: datetime
    error: str | None


@dataclass(frozen=True)
class Rollout:
    """The pointers of one index alias. `generation` increases by one on every change."""

    index: str
    stable: str | None
    canary: str | None
    canary_percent: int
    shadow: str | None
    shadow_percent: int
    previous_stable: str | None
    generation: int
    updated_at: datetime

    def pointers(self) -> dict[str, Any]:
        """What the audit log records before and after a change (JSON-ready)."""
        return {"stable": self.stable, "canary": self.canary, "canary_percent": self.canary_percent,
                "shadow": self.shadow, "shadow_percent": self.shadow_percent,
                "previous_stable": self.previous_stable, "generation": self.generation}

    def roles(self, version: str) -> list[str]:
        """The pointers naming `version`, in display order (empty when it serves nothing)."""
        named = (("stable", self.stable), ("canary", self.canary), ("shadow", self.shadow),
                 ("previous", self.previous_stable))
        return [role for role, pointer in named if pointer == version]


@dataclass(frozen=True)
class AuditEntry:
    id: int
    index: str
    at: datetime
    actor: str
    action: str
    reason: str
    before: Mapping[str, Any]
    after: Mapping[str, Any]


@dataclass(frozen=True)
class ReplicaRecord:
    """A server process sharing this registry, as of its last heartbeat. `served` maps each
    index it serves to the rollout generation it has applied; `live` is whether that heartbeat
    is recent enough (judged by the reader's clock when the list was taken)."""

    replica_id: str
    address: str
    last_seen: datetime
    served: Mapping[str, int]
    live: bool

    def acknowledges(self, index: str, generation: int) -> bool:
        """Whether this replica has applied `generation` (or a later one) of `index`."""
        applied = self.served.get(index)
        return applied is not None and applied >= generation


@dataclass(frozen=True)
class EvaluationRecord:
    """One evaluation run of a version against a query set (metric name -> value)."""

    id: int
    index: str
    version: str
    query_set: str
    metrics: Mapping[str, float]
    at: datetime
    actor: str
