"""What this server serves right now: an immutable snapshot {index -> loaded version}.

Readers take the snapshot once per request (or per stream) and keep that object, so a request
never mixes versions and a version swapped out stays alive until its in-flight requests finish
(Python keeps it referenced). `refresh()` loads new stable versions fully *before* swapping the
pointer; a failed load leaves the previous version serving and records why.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from colgrid_registry import Registry, VersionState
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.errors import ColgridError, FailedPrecondition
from colgrid_server.index import LoadedVersion, open_version
from colgrid_server.search import Searcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersion:
    index: str
    version: str
    generation: int
    loaded: LoadedVersion
    searcher: Searcher
    encoder: object  # TextEncoder

    @property
    def encoder_id(self) -> str:
        return self.loaded.encoder.id


class ServingState:
    def __init__(self, registry: Registry, catalog: EncoderCatalog, *, device: str | None = None) -> None:
        self._registry = registry
        self._catalog = catalog
        self._device = device
        self._snapshot: Mapping[str, ServedVersion] = MappingProxyType({})
        self._load_errors: dict[tuple[str, str], str] = {}
        self._refresh_lock = threading.Lock()

    @property
    def catalog(self) -> EncoderCatalog:
        return self._catalog

    @property
    def registry(self) -> Registry:
        return self._registry

    def snapshot(self) -> Mapping[str, ServedVersion]:
        return self._snapshot

    def resolve(self, index: str) -> ServedVersion:
        """The version serving `index` now. Called once per request/stream."""
        served = self._snapshot.get(index)
        if served is not None:
            return served
        self._registry.get_index(index)  # raises IndexNotFound for unknown names
        rollout = self._registry.get_rollout(index)
        if not rollout.stable:
            raise FailedPrecondition(f"index {index!r} has no READY version to serve yet; "
                                     f"build one with `colgrid index build {index} --input ...`")
        why = self._load_errors.get((index, rollout.stable), "it is still loading")
        raise FailedPrecondition(f"index {index!r} version {rollout.stable} is not loaded on this server: {why}")

    def load_error(self, index: str, version: str) -> str | None:
        return self._load_errors.get((index, version))

    def refresh(self) -> bool:
        """Bring the snapshot in line with the registry's stable pointers. Returns True when
        every index that has a stable version is being served at that version."""
        with self._refresh_lock:
            current = dict(self._snapshot)
            complete = True
            wanted: set[str] = set()
            for record in self._registry.list_indexes():
                rollout = self._registry.get_rollout(record.name)
                if not rollout.stable:
                    continue
                wanted.add(record.name)
                served = current.get(record.name)
                if served is not None and served.version == rollout.stable:
                    if served.generation != rollout.generation:
                        current[record.name] = _with_generation(served, rollout.generation)
                    continue
                if (record.name, rollout.stable) in self._load_errors:
                    complete = False  # already failed; do not retry every poll
                    continue
                try:
                    current[record.name] = self._load(record.name, rollout.stable, rollout.generation)
                except ColgridError as exc:
                    complete = False
                    self._load_errors[(record.name, rollout.stable)] = str(exc)
                    log.error("could not load %s/%s (keeping %s): %s", record.name, rollout.stable,
                              served.version if served else "nothing", exc)
            for name in list(current):
                if name not in wanted:
                    del current[name]
            self._snapshot = MappingProxyType(current)
            return complete

    def _load(self, index: str, version: str, generation: int) -> ServedVersion:
        record = self._registry.get_version(index, version)
        if record.state != VersionState.READY:
            raise FailedPrecondition(f"{index}/{version} is {record.state.value}, not READY")
        loaded = open_version(Path(record.storage_uri), verify=True, device=self._device)
        if record.manifest_sha256 and getattr(loaded, "manifest_sha256", record.manifest_sha256) != record.manifest_sha256:
            raise FailedPrecondition(f"{index}/{version}: manifest on disk differs from the registry's record")
        encoder = self._catalog.get(loaded.encoder.id)
        log.info("loaded %s/%s: %d documents, %d tokens", index, version, loaded.documents, loaded.tokens_count)
        return ServedVersion(index=index, version=version, generation=generation, loaded=loaded,
                             searcher=Searcher(loaded), encoder=encoder)

    def find_encoder(self, encoder_id: str):
        return self._catalog.get(encoder_id)


def _with_generation(served: ServedVersion, generation: int) -> ServedVersion:
    return ServedVersion(index=served.index, version=served.version, generation=generation,
                         loaded=served.loaded, searcher=served.searcher, encoder=served.encoder)
