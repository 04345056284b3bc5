"""Encoders available under a data dir, addressed by identity (sha256 of their files)."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from colgrid_server.encoders import encoder_id, load_any_encoder
from colgrid_server.errors import NotFound
from colgrid_server.encoders.batching import BatchingEncoder

log = logging.getLogger(__name__)


class EncoderCatalog:
    """Maps encoder ids to directories under `root` and keeps loaded sessions, one per id.
    `fetch(id, root)`, when given, brings an encoder that is not under root there (from object
    storage: ObjectStorage.fetch_encoder) and returns its directory."""

    def __init__(self, root: Path, *, threads: int | None = None,
                 fetch: Callable[[str, Path], Path] | None = None) -> None:
        self._root = root
        self._threads = threads
        self._fetch = fetch
        self._paths: dict[str, Path] = {}
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def _scan(self) -> None:
        if not self._root.is_dir():
            return
        known = set(self._paths.values())
        for spec_file in sorted(self._root.glob("*/encoder.json")):
            path = spec_file.parent
            if path in known:
                continue
            try:
                self._paths[encoder_id(path)] = path
            except OSError as exc:  # a half-copied dir: skip it, the next scan retries
                log.warning("skipping encoder dir %s: %s", path, exc)

    def register(self, path: Path) -> str:
        ident = encoder_id(path)
        with self._lock:
            self._paths[ident] = path
        return ident

    def path_for(self, ident: str) -> Path:
        with self._lock:
            if ident not in self._paths:
                self._scan()
            found = self._paths.get(ident)
        if found is not None:
            return found
        if self._fetch is None:
            raise NotFound(f"encoder {ident[:16]}… is not in this server's encoders directory; export it "
                           "(`colgrid encoder export`) or copy its directory into <data dir>/encoders",
                           resource_type="encoder", resource_name=ident)
        path = self._fetch(ident, self._root)  # outside the lock: a download must not stall other lookups
        with self._lock:
            return self._paths.setdefault(ident, path)

    def get(self, ident: str):
        """The loaded encoder for `ident`, text or multimodal by its kind (loaded once, then shared)."""
        with self._lock:
            cached = self._loaded.get(ident)
        if cached is not None:
            return cached
        path = self.path_for(ident)
        # Single-query encodes from concurrent requests share model runs (encoders/batching.py).
        encoder = BatchingEncoder(load_any_encoder(path, threads=self._threads))
        with self._lock:
            return self._loaded.setdefault(ident, encoder)
