"""Builds that were killed: BUILDING rows whose builder process is gone, and their leftovers.

A build records which process runs it (host, pid) in its version's build_params. A BUILDING
version whose builder ran on this host and is no longer alive was interrupted (kill -9, a
crash, a power cut): it is marked FAILED ("interrupted"), and what it left on disk (the hidden
`.vN.tmp-*` directory, or a complete directory the registry never called READY) is removed.
BUILDING rows of other hosts are left alone unless older than `foreign_older_than_s`.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colgrid_registry import IndexNotFound, InvalidTransition, Registry, VersionState
from colgrid_server.paths import DataDir


def builder_identity() -> dict[str, Any]:
    """What a build records about the process running it (build_params["builder"])."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


@dataclass(frozen=True)
class Interrupted:
    index: str
    version: str
    reason: str
    removed: tuple[str, ...]


def collect_interrupted(data: DataDir, registry: Registry, index: str | None = None, *,
                        foreign_older_than_s: float | None = None) -> list[Interrupted]:
    """Mark interrupted builds FAILED and remove their files; returns what was collected."""
    names = [index] if index else [record.name for record in registry.list_indexes()]
    collected = []
    for name in names:
        try:
            versions = registry.list_versions(name)
        except IndexNotFound:
            continue
        for record in versions:
            if record.state is not VersionState.BUILDING:
                continue
            reason = _interrupted(record.build_params.get("builder"), foreign_older_than_s)
            if reason is None:
                continue
            try:
                registry.mark_failed(name, record.version, f"interrupted: {reason}")
            except InvalidTransition:  # it finished (or failed) meanwhile: not ours to touch
                continue
            collected.append(Interrupted(name, record.version, reason, _remove_leftovers(data, name, record.version)))
    return collected


def _interrupted(builder: Any, foreign_older_than_s: float | None) -> str | None:
    if not isinstance(builder, dict) or not isinstance(builder.get("pid"), int):
        return None  # built before builders were recorded: cannot tell
    if builder.get("host") == socket.gethostname():
        return None if _alive(builder["pid"]) else f"builder process {builder['pid']} on this host is gone"
    started = builder.get("started")
    if foreign_older_than_s is not None and isinstance(started, (int, float)) \
            and time.time() - started > foreign_older_than_s:
        return f"builder on {builder.get('host')} started {time.time() - started:.0f} s ago"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_leftovers(data: DataDir, index: str, version: str) -> tuple[str, ...]:
    directory = data.index_dir(index)
    if not directory.is_dir():
        return ()
    removed = []
    for path in sorted(directory.iterdir()):
        if path.name == version or path.name.startswith(f".{version}.tmp-"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return tuple(removed)


def leftover_paths(directory: Path) -> list[Path]:
    """Hidden temporary build directories under an index directory (for reports)."""
    return sorted(p for p in directory.glob(".*.tmp-*") if p.is_dir())
