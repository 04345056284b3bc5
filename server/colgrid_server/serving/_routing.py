"""Which loaded version answers a request: sticky canary buckets, sampled shadow traffic.

A routing key hashes (with the index name) to one of BUCKETS buckets; the canary takes the
buckets below canary_percent * BUCKETS / 100. The same key therefore sees the same version
while the percent is unchanged, and raising the percent only moves keys from stable to canary,
never back. A request without a key draws a random bucket.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from colgrid_registry import Rollout
from colgrid_server.serving._versions import ServedVersion

BUCKETS = 10_000


def bucket_of(index: str, routing_key: str) -> int:
    """A stable bucket in [0, BUCKETS) for (index, key); random when the key is empty."""
    if not routing_key:
        return random.randrange(BUCKETS)
    digest = hashlib.blake2b(f"{index}\x00{routing_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


@dataclass(frozen=True)
class IndexRoutes:
    """An immutable routing table for one index: the rollout it implements and the loaded
    versions it names. `complete` is False when it serves less than the rollout asks (a fresh
    server whose canary or shadow failed to load serves stable alone and does not acknowledge
    the generation)."""

    rollout: Rollout
    stable: ServedVersion
    canary: ServedVersion | None = None
    shadow: ServedVersion | None = None
    complete: bool = True
    # previous_stable, still loaded from when it served: never routed to, kept warm so that a
    # rollback is a pointer flip here too. Never loaded just to be a standby.
    standby: ServedVersion | None = None

    @property
    def index(self) -> str:
        return self.rollout.index

    @property
    def generation(self) -> int:
        return self.rollout.generation

    @property
    def canary_percent(self) -> int:
        return self.rollout.canary_percent if self.canary is not None else 0

    @property
    def shadow_percent(self) -> int:
        return self.rollout.shadow_percent if self.shadow is not None else 0

    def primary_for(self, bucket: int) -> tuple[str, ServedVersion]:
        """(role, version) answering a request in `bucket`."""
        if self.canary is not None and bucket < self.canary_percent * BUCKETS // 100:
            return "canary", self.canary
        return "stable", self.stable

    def sample_shadow(self) -> ServedVersion | None:
        """The shadow version for this request, drawn for shadow_percent of requests."""
        if self.shadow is None or random.random() * 100 >= self.shadow_percent:
            return None
        return self.shadow

    def versions(self) -> dict[str, ServedVersion]:
        """Loaded versions by role ("previous" for the standby)."""
        named = (("stable", self.stable), ("canary", self.canary), ("shadow", self.shadow),
                 ("previous", self.standby))
        return {role: v for role, v in named if v is not None}
