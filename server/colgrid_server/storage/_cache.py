"""The local copies of remote versions: one directory per URI, installed whole or not at all.

A copy is downloaded into a hidden staging directory next to its place and renamed into place
once every file matched the manifest, so a crash mid-download leaves only a staging directory
(removed by the next fetch of that version), never a half copy that looks complete. A lock file
per version serialises fetches of the same version across threads and processes.

With a size budget, `trim` removes the least recently used copies until the cache fits. A copy
that a server holds open is pinned (a shared lock on its `.in-use` file for as long as it is
loaded), so trimming never takes it, in this process or another one sharing the directory.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from colgrid_server.errors import CorruptVersion, InvalidArgument
from colgrid_server.index import MANIFEST_NAME
from colgrid_server.index._manifest import fsync_dir, fsync_tree, read_manifest, verify_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedCopy:
    path: Path
    size: int  # bytes of every file of the copy
    last_used: float  # when it was last fetched or installed (epoch seconds)


class Pin:
    """A shared lock on a copy's in-use file: held while a server has the copy loaded."""

    def __init__(self, path: Path) -> None:
        self._fh = open(_beside(path, "in-use"), "a+b")  # noqa: SIM115 - held until release()
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_SH)
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._fh.closed:
                return
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()


def _beside(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.{what}"


class VersionCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path_for(self, uri: str) -> Path:
        """<root>/<scheme>/<bucket>/<key...>: the last component stays the version's name."""
        scheme, _, rest = uri.partition("://")
        parts = [part for part in rest.split("/") if part]
        if not scheme or not parts or any(part in (".", "..") for part in parts):
            raise InvalidArgument(f"{uri!r} is not an object-storage URI of a version", field="storage_uri")
        return self.root.joinpath(scheme.lower(), *parts)

    @contextmanager
    def locked(self, path: Path) -> Iterator[None]:
        """Exclusive use of the copy at `path` (flock: per open file, so threads exclude each other too)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(_beside(path, "lock"), "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def usable(self, path: Path, manifest_sha256: str | None) -> bool:
        """A complete copy whose files have the sizes its manifest lists (the cheap check: the
        full sha256 check happens when the version is opened) and, if given, that manifest."""
        if not (path / MANIFEST_NAME).is_file():
            return False
        try:
            files, sha = read_manifest(path)
            verify_files(path, files, hashes=False)
        except CorruptVersion:
            return False
        return not manifest_sha256 or sha == manifest_sha256

    def staging(self, path: Path) -> Path:
        """A fresh hidden directory beside `path`, after removing what crashed fetches left there."""
        for leftover in path.parent.glob(f".{path.name}.fetch-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = path.parent / f".{path.name}.fetch-{secrets.token_hex(6)}"
        tmp.mkdir(parents=True)
        return tmp

    def install(self, staged: Path, path: Path) -> None:
        """Durably move a verified staging directory into place (one rename)."""
        fsync_tree(staged)
        os.rename(staged, path)
        fsync_dir(path.parent)

    def discard(self, path: Path) -> None:
        """Remove a copy: renamed aside first, so its place is free at once even if removal is slow."""
        if not path.exists():
            return
        aside = path.parent / f".{path.name}.stale-{secrets.token_hex(6)}"
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)

    # --- use and size ---------------------------------------------------------------------------

    def touch(self, path: Path) -> None:
        """Record a use of the copy at `path` (the mtime of its `.used` file)."""
        marker = _beside(path, "used")
        marker.touch()
        os.utime(marker)

    def pin(self, path: Path) -> Pin:
        """Keep `trim` away from the copy until the pin is released."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return Pin(path)

    def copies(self) -> list[CachedCopy]:
        """Every complete copy in the cache (a directory holding a manifest), least recently used first."""
        found: list[CachedCopy] = []
        if not self.root.is_dir():
            return found
        for top, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # staging and stale directories
            if MANIFEST_NAME not in files or top == str(self.root):
                continue
            dirs[:] = []  # a version's own subdirectories are part of it
            path = Path(top)
            found.append(CachedCopy(path, _tree_bytes(path), _last_used(path)))
        return sorted(found, key=lambda c: c.last_used)

    def trim(self, max_bytes: int, *, keep: Iterable[Path] = ()) -> list[Path]:
        """Remove least recently used copies, never a pinned one nor one in `keep`, until the
        copies take at most `max_bytes`. Returns the removed copies' paths."""
        kept = {Path(p).resolve() for p in keep}
        copies = self.copies()
        total = sum(c.size for c in copies)
        removed: list[Path] = []
        for copy in copies:
            if total <= max_bytes:
                break
            if copy.path in kept or not self._discard_unpinned(copy.path):
                continue
            total -= copy.size
            removed.append(copy.path)
            log.info("removed the cached copy %s (%.1f MB, last used %s) to keep the cache under %.1f MB",
                     copy.path, copy.size / 1e6, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(copy.last_used)),
                     max_bytes / 1e6)
        if total > max_bytes:
            log.warning("the version cache %s holds %.1f MB, over its budget of %.1f MB: the rest is in use",
                        self.root, total / 1e6, max_bytes / 1e6)
        return removed

    def _discard_unpinned(self, path: Path) -> bool:
        """Remove the copy unless it is being fetched or is loaded (never waits: two trims each
        holding one copy's lock must not wait for each other)."""
        with open(_beside(path, "lock"), "a+b") as fetching, open(_beside(path, "in-use"), "a+b") as loaded:
            try:
                fcntl.flock(fetching.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            try:
                fcntl.flock(loaded.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # closing `fetching` drops its lock
            self.discard(path)
        return True


def _tree_bytes(path: Path) -> int:
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(top, name))
            except FileNotFoundError:  # removed meanwhile (another process trimming)
                continue
    return total


def _last_used(path: Path) -> float:
    """The `.used` marker's mtime; a copy never marked (built here) counts from its manifest."""
    for candidate in (_beside(path, "used"), path / MANIFEST_NAME):
        try:
            return candidate.stat().st_mtime
        except FileNotFoundError:
            continue
    return 0.0
