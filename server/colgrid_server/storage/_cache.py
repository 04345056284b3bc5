"""The local copies of remote versions: one directory per URI, installed whole or not at all.

A copy is downloaded into a hidden staging directory next to its place and renamed into place
once every file matched the manifest, so a crash mid-download leaves only a staging directory
(removed by the next fetch of that version), never a half copy that looks complete. A lock file
per version serialises fetches of the same version across threads and processes.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from colgrid_server.errors import CorruptVersion, InvalidArgument
from colgrid_server.index import MANIFEST_NAME
from colgrid_server.index._manifest import fsync_dir, fsync_tree, read_manifest, verify_files


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
        with open(path.parent / f".{path.name}.lock", "a+b") as fh:
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
