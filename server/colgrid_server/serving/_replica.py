"""This server as one replica among those sharing a registry: it reports, by heartbeat, which
rollout generation of each index it serves, and reads back who has caught up with a change."""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from colgrid_registry import Registry, RegistryError, ReplicaRecord
from colgrid_server.serving._state import ServingState

log = logging.getLogger(__name__)


def default_replica_id(host: str, port: int) -> str:
    """host:port+pid: unique among processes on one machine, readable in `rollout status`."""
    return f"{advertised_host(host)}:{port}+{os.getpid()}"


def advertised_host(host: str) -> str:
    return socket.gethostname() if host in ("", "0.0.0.0", "::", "[::]") else host


@dataclass(frozen=True)
class Acknowledgements:
    """Who serves `generation` of `index`: every known replica, and the live ones not there yet."""

    index: str
    generation: int
    replicas: tuple[ReplicaRecord, ...]

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.replica_id for r in self.replicas if r.live and not r.acknowledges(self.index, self.generation))


class Replica:
    """Heartbeats for one server. `live_within_s` is how recent a heartbeat must be for the
    replica to count as live (and so be waited for): a few poll intervals."""

    def __init__(self, registry: Registry, state: ServingState, *, replica_id: str, address: str,
                 live_within_s: float, forget_after_s: float = 0.0) -> None:
        """forget_after_s > 0: replicas silent that long (killed, never said goodbye) are dropped
        from the registry's list by whichever replica notices first (0: never)."""
        self.registry = registry
        self.state = state
        self.replica_id = replica_id
        self.address = address
        self.live_within_s = live_within_s
        self.forget_after_s = forget_after_s
        self._last_sweep = float("-inf")

    def heartbeat(self) -> bool:
        """Report {index: generation served}; False (logged) if the registry could not take it."""
        try:
            self.registry.heartbeat(self.replica_id, address=self.address, served=self.state.served_generations())
        except RegistryError as exc:
            log.warning("heartbeat to the registry failed (will retry next poll): %s", exc)
            return False
        self._sweep()
        return True

    def _sweep(self) -> None:
        # A tenth of the window between sweeps: a write every few minutes, not every poll.
        if self.forget_after_s <= 0 or time.monotonic() - self._last_sweep < self.forget_after_s / 10:
            return
        self._last_sweep = time.monotonic()
        try:
            for gone in self.registry.forget_stale_replicas(older_than_s=self.forget_after_s):
                log.info("forgot replica %s: no heartbeat for %.0f s", gone, self.forget_after_s)
        except RegistryError as exc:
            log.warning("could not forget stale replicas: %s", exc)

    def forget(self) -> None:
        """Leave the registry's replica list (graceful shutdown): nobody waits for us any more."""
        try:
            self.registry.forget_replica(self.replica_id)
        except RegistryError as exc:
            log.warning("could not remove replica %s from the registry: %s", self.replica_id, exc)

    def acknowledgements(self, index: str, generation: int) -> Acknowledgements:
        replicas = self.registry.list_replicas(live_within_s=self.live_within_s)
        return Acknowledgements(index, generation, tuple(replicas))
