"""What this server serves right now: an immutable snapshot {index -> IndexRoutes}.

Readers take the snapshot once per request (or per stream) and lease the version it routes
them to, so a request never mixes versions. `refresh()` brings the snapshot in line with the
registry: every version a new rollout names is loaded, checked and warmed *before* the snapshot
that routes traffic to it is published; if one fails, the index keeps its previous routes (the
failure is recorded and reported) and the server does not acknowledge the new generation.
Versions no snapshot references any more are retired, and close when their last lease ends.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

from colgrid_registry import Registry, RegistryError, Rollout
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.errors import ColgridError, FailedPrecondition
from colgrid_server.serving._routing import IndexRoutes, bucket_of
from colgrid_server.serving._shadow import ShadowRunner
from colgrid_server.serving._versions import Lease, ServedVersion, VersionCheckFailed, check_ready, load_version
from colgrid_server.storage import LocalStorage, VersionStorage

RECALL_QUEUE = 4  # sampled-recall reruns waiting or running at most

log = logging.getLogger(__name__)

LOAD_RETRY_SECONDS = 30.0  # a failed load is retried on a new generation, or after this long


@dataclass(frozen=True)
class LoadFailure:
    """A version this server could not load for the rollout at `generation`."""

    index: str
    version: str
    check: str        # the failed check (see CHECKS), or "load"
    message: str
    generation: int
    at: float         # time.time()


@dataclass(frozen=True)
class VersionUse:
    """A version this server holds: its roles in the current routes (none while draining)."""

    index: str
    version: str
    roles: tuple[str, ...]
    in_flight: int
    draining: bool


@dataclass(frozen=True)
class Route:
    """The resolution of one request (or stream): the version answering it, under lease, and
    maybe a shadow version (leased too) to run the same query on afterwards."""

    index: str
    generation: int
    role: str           # "stable" or "canary"
    primary: Lease
    shadow: Lease | None = None

    @property
    def version(self) -> ServedVersion:
        return self.primary.version

    def release(self) -> None:
        self.primary.release()
        if self.shadow is not None:
            self.shadow.release()


class ServingState:
    def __init__(self, registry: Registry, catalog: EncoderCatalog, *, device: str | None = None,
                 shadow: ShadowRunner | None = None, storage: VersionStorage | None = None,
                 screen: bool = False) -> None:
        """storage: where versions are fetched from (object storage: into its local cache) and
        where builds on this server publish them; default local directories. screen: load CPU
        versions with the int8 MaxSim screen (settings.int8_screen)."""
        self._registry = registry
        self._catalog = catalog
        self._device = device
        self._screen = screen
        self._storage = storage or LocalStorage()
        self.shadow = shadow or ShadowRunner()
        # Sampled recall (settings.recall_sample_rate): exhaustive reruns of answered searches,
        # one at a time, at most a few waiting: under load samples are shed, never searches.
        self.recall = ShadowRunner(workers=1, capacity=RECALL_QUEUE, name="recall")
        self._snapshot: Mapping[str, IndexRoutes] = MappingProxyType({})
        # Written under _lock, copy-on-write, so readers (GetRollout, routes) never wait on a load.
        self._failures: Mapping[tuple[str, str], LoadFailure] = {}
        self._prepared: dict[tuple[str, str], ServedVersion] = {}
        self._held: frozenset[ServedVersion] = frozenset()  # loaded, not closed: routed, prepared, draining
        self._lock = threading.RLock()  # refresh, prepare and retirement; never held by readers

    @property
    def catalog(self) -> EncoderCatalog:
        return self._catalog

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def storage(self) -> VersionStorage:
        return self._storage

    def snapshot(self) -> Mapping[str, IndexRoutes]:
        return self._snapshot

    # --- readers --------------------------------------------------------------------------------

    def routes(self, index: str) -> IndexRoutes:
        """The routes of `index` now, or the reason it cannot be served (NotFound for an unknown
        index, FailedPrecondition when it has nothing loaded)."""
        routes = self._snapshot.get(index)
        if routes is not None:
            return routes
        self._registry.get_index(index)  # raises IndexNotFound for unknown names
        rollout = self._registry.get_rollout(index)
        if not rollout.stable:
            raise FailedPrecondition(f"index {index!r} has no READY version to serve yet; "
                                     f"build one with `colgrid index build {index} --input ...`")
        failure = self._failures.get((index, rollout.stable))
        why = failure.message if failure else "it is still loading"
        raise FailedPrecondition(f"index {index!r} version {rollout.stable} is not loaded on this server: {why}")

    def resolve(self, index: str) -> ServedVersion:
        """The stable version of `index` (for callers that need its encoder, not a search)."""
        return self.routes(index).stable

    def route(self, index: str, routing_key: str = "", *, shadow: bool = True) -> Route:
        """Resolve `index` once for one request or stream and lease what it will read. The
        caller must `release()` the route (the shadow lease passes to the ShadowRunner)."""
        for _ in range(8):
            routes = self.routes(index)
            role, version = routes.primary_for(bucket_of(index, routing_key))
            primary = version.acquire()
            if primary is None:
                continue  # closed after a newer snapshot went out: read that one
            sampled = routes.sample_shadow() if shadow else None
            return Route(index=index, generation=routes.generation, role=role, primary=primary,
                         shadow=sampled.acquire() if sampled is not None else None)
        raise FailedPrecondition(f"index {index!r} is changing versions too fast to route a request; retry")

    def lease_version(self, index: str, version: str) -> Lease:
        """A lease on `version` of `index` if this server holds it loaded (stable, canary,
        shadow, the warm previous stable, or one being prepared); never loads one. NotFound for
        an unknown index or version, FailedPrecondition for a version not loaded here."""
        for _ in range(8):
            routes = self.routes(index)  # NotFound / FailedPrecondition for an index not served
            served = self._find_live(index, version)
            if served is None:
                self._registry.get_version(index, version)  # VersionNotFound for a name that does not exist
                loaded = ", ".join(sorted({v.version for v in routes.versions().values()}))
                raise FailedPrecondition(f"index {index!r} version {version} is not loaded on this server "
                                         f"(loaded: {loaded}); leave the version empty to use the routed one")
            lease = served.acquire()
            if lease is not None:
                return lease
        raise FailedPrecondition(f"index {index!r} is changing versions too fast to lease {version}; retry")

    def shadow_for(self, index: str) -> Lease | None:
        """A leased shadow version for one more request of `index` (streams sample per request)."""
        routes = self._snapshot.get(index)
        sampled = routes.sample_shadow() if routes is not None else None
        return sampled.acquire() if sampled is not None else None

    def served_generations(self) -> dict[str, int]:
        """{index: rollout generation} for every index this server serves completely: what it
        reports to the registry as acknowledged."""
        return {name: r.generation for name, r in self._snapshot.items() if r.complete}

    def load_failures(self, index: str | None = None) -> list[LoadFailure]:
        return [f for f in self._failures.values() if index is None or f.index == index]

    def load_error(self, index: str, version: str) -> str | None:
        failure = self._failures.get((index, version))
        return failure.message if failure else None

    def versions_held(self, index: str | None = None) -> list[VersionUse]:
        """Versions in memory: routed, prepared, or retired and still draining."""
        held = sorted((v for v in self._held if not v.closed), key=lambda v: (v.index, v.version, v.loaded_at))
        roles: dict[int, list[str]] = {}
        for routes in self._snapshot.values():
            for role, v in routes.versions().items():
                roles.setdefault(id(v), []).append(role)
        return [VersionUse(v.index, v.version, tuple(roles.get(id(v), ())), v.in_flight, v.retired)
                for v in held if index is None or v.index == index]

    def find_encoder(self, encoder_id: str):
        return self._catalog.get(encoder_id)

    # --- writers --------------------------------------------------------------------------------

    @contextmanager
    def prepared(self, index: str, version: str) -> Iterator[ServedVersion]:
        """Run every check on `version` and keep it loaded while the block runs, so a rollout
        change made inside the block publishes an already-warm version. Raises
        VersionCheckFailed. On exit the version is dropped unless a snapshot now routes to it."""
        key = (index, version)
        with self._lock:
            current = self._find_live(index, version)
        record = self._registry.get_version(index, version)
        if current is not None:  # loaded, verified and warmed already: only the registry may have moved
            check_ready(record)
            yield current
            return
        served = load_version(record, self._catalog, device=self._device, storage=self._storage,
                              screen=self._screen)
        with self._lock:
            self._held = self._held | {served}
            self._prepared[key] = served
        try:
            yield served
        finally:
            with self._lock:
                if self._prepared.get(key) is served:
                    del self._prepared[key]
                if self._find_live(index, version) is not served:
                    served.retire()

    def refresh(self) -> bool:
        """Bring the snapshot in line with the registry. True when every index with a stable
        version is served completely at its current generation."""
        with self._lock:
            before = self._snapshot
            after: dict[str, IndexRoutes] = {}
            complete = True
            for record in self._registry.list_indexes():
                rollout = self._registry.get_rollout(record.name)
                if not rollout.stable:
                    continue
                routes = self._routes_for(rollout, before.get(record.name))
                if routes is not None:
                    after[record.name] = routes
                complete = complete and routes is not None and routes.complete \
                    and routes.generation == rollout.generation
            self._snapshot = MappingProxyType(after)
            self._retire_unreferenced()
            return complete

    def _routes_for(self, rollout: Rollout, current: IndexRoutes | None) -> IndexRoutes | None:
        """Routes implementing `rollout`; else `current` (kept serving) when a version fails to
        load; else, on a server that serves nothing yet, stable alone if it loads. Versions
        loaded here and not used are retired by refresh() once the snapshot is published."""
        if current is not None and current.generation == rollout.generation and current.complete:
            return current
        index = rollout.index
        wanted = {role: name for role, name in
                  (("stable", rollout.stable), ("canary", rollout.canary), ("shadow", rollout.shadow)) if name}
        self._forget_failures(index, keep=set(wanted.values()))
        loaded = {role: served for role, name in wanted.items()
                  if (served := self._obtain(rollout, name, current)) is not None}
        if len(loaded) == len(wanted):
            standby = None
            if rollout.previous_stable and rollout.previous_stable not in wanted.values():
                standby = self._find_live(index, rollout.previous_stable, current)
            return IndexRoutes(rollout, loaded["stable"], loaded.get("canary"), loaded.get("shadow"),
                               standby=standby)
        if current is not None:
            log.error("%s: generation %d keeps serving (stable %s): generation %d could not be loaded",
                      index, current.generation, current.stable.version, rollout.generation)
            return current
        if "stable" in loaded:
            return IndexRoutes(rollout, loaded["stable"], complete=False)
        return None

    def _obtain(self, rollout: Rollout, version: str, current: IndexRoutes | None) -> ServedVersion | None:
        """`version` loaded: reused from the current routes or a prepared one, else loaded now.
        None (with the failure recorded) if it cannot be; a recorded failure is retried on a
        new generation or after LOAD_RETRY_SECONDS."""
        index = rollout.index
        found = self._find_live(index, version, current)
        if found is not None:
            return found
        failure = self._failures.get((index, version))
        if failure is not None and failure.generation == rollout.generation \
                and time.time() - failure.at < LOAD_RETRY_SECONDS:
            return None
        try:
            served = load_version(self._registry.get_version(index, version), self._catalog, device=self._device,
                                  storage=self._storage, screen=self._screen)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the previous routes keep serving
            check = exc.check if isinstance(exc, VersionCheckFailed) else "load"
            if not isinstance(exc, (ColgridError, RegistryError)):
                log.exception("unexpected error loading %s/%s", index, version)
            failure = LoadFailure(index, version, check, str(exc), rollout.generation, time.time())
            self._failures = {**self._failures, (index, version): failure}
            log.error("could not load %s/%s for generation %d: %s", index, version, rollout.generation, exc)
            return None
        self._failures = {k: f for k, f in self._failures.items() if k != (index, version)}
        self._held = self._held | {served}
        log.info("loaded %s/%s: %d documents, %d tokens (encoder %s)", index, version,
                 served.loaded.documents, served.loaded.tokens_count, served.encoder_id[:12])
        return served

    def _find_live(self, index: str, version: str, current: IndexRoutes | None = None) -> ServedVersion | None:
        routes = current if current is not None else self._snapshot.get(index)
        if routes is not None:
            for served in routes.versions().values():
                if served.version == version and not served.retired:
                    return served
        prepared = self._prepared.get((index, version))
        return prepared if prepared is not None and not prepared.retired else None

    def _forget_failures(self, index: str, keep: set[str]) -> None:
        self._failures = {k: f for k, f in self._failures.items() if k[0] != index or k[1] in keep}

    def _retire_unreferenced(self) -> None:
        """Retire every held version the published snapshot does not route to and no change
        is preparing (each closes once its in-flight requests drain)."""
        live = {id(v) for routes in self._snapshot.values() for v in routes.versions().values()}
        live |= {id(v) for v in self._prepared.values()}
        for served in self._held:
            if id(served) not in live:
                served.retire()
        self._held = frozenset(v for v in self._held if not v.closed)

    def close(self) -> None:
        """Stop shadow work and retire everything (each version closes once drained)."""
        self.shadow.close()
        self.recall.close()
        with self._lock:
            self._snapshot = MappingProxyType({})
            for served in self._held:
                served.retire()
