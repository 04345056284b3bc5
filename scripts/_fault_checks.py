"""What must hold after a process was killed with SIGKILL (DESIGN.md "Registry and rollouts":
kill -9 at any point leaves the registry on old or new, never on an incomplete version).

Each check returns a list of violations (empty: the invariant held) and the facts it saw, so a
trial can report where its kill landed as well as whether anything broke.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colgrid_registry import Registry, Rollout, VersionState

Pointers = Mapping[str, Any]  # Rollout.pointers(): stable, canary, ..., generation


@dataclass(frozen=True)
class VersionFacts:
    ready: tuple[str, ...]
    building: tuple[str, ...]
    failed: tuple[str, ...]
    published_not_ready: tuple[str, ...]  # BUILDING rows whose directory is complete on disk
    tmp_dirs: tuple[str, ...]             # hidden .<version>.tmp-* directories of killed writers


@dataclass(frozen=True)
class PendingChange:
    """A rollout change that was in flight (sent, not acknowledged) when the kill came.
    `expect(before, after)` names what is wrong with `after` as its result, or None."""

    action: str
    arguments: Mapping[str, Any]
    expect: Callable[[Pointers, Pointers], str | None]


def check_versions(registry: Registry, index: str, index_dir: Path, *,
                   once_building: Collection[str]) -> tuple[list[str], VersionFacts]:
    """Every READY version is complete and matches its manifest and the registry's checksum;
    no version seen BUILDING after its builder was killed has become READY since."""
    from colgrid_server.errors import ColgridError
    from colgrid_server.index import verify_version, version_exists

    problems: list[str] = []
    by_state: dict[VersionState, list[str]] = {s: [] for s in VersionState}
    published_not_ready = []
    for v in registry.list_versions(index):
        by_state[v.state].append(v.version)
        path = Path(v.storage_uri) if v.storage_uri else index_dir / v.version
        if v.state is VersionState.READY:
            if v.version in once_building:
                problems.append(f"{v.version} was BUILDING after its builder was killed, and is READY now")
            if not v.storage_uri:
                problems.append(f"{v.version} is READY with no storage_uri")
                continue
            if not version_exists(path):
                problems.append(f"{v.version} is READY but {path} has no manifest (incomplete)")
                continue
            try:
                sha = verify_version(path)
            except ColgridError as exc:
                problems.append(f"{v.version} is READY but does not verify: {exc}")
                continue
            if sha != v.manifest_sha256:
                problems.append(f"{v.version}: manifest sha256 {sha[:12]} differs from the registry's "
                                f"{(v.manifest_sha256 or '-')[:12]}")
        elif v.state is VersionState.BUILDING and version_exists(path):
            published_not_ready.append(v.version)
    tmp_dirs = sorted(p.name for p in index_dir.glob(".*.tmp-*")) if index_dir.is_dir() else []
    facts = VersionFacts(ready=tuple(by_state[VersionState.READY]), building=tuple(by_state[VersionState.BUILDING]),
                         failed=tuple(by_state[VersionState.FAILED]),
                         published_not_ready=tuple(published_not_ready), tmp_dirs=tuple(tmp_dirs))
    return problems, facts


def check_rollout(registry: Registry, index: str, acked: Pointers,
                  pending: PendingChange | None) -> tuple[list[str], str, Rollout]:
    """The rollout is exactly the last acknowledged one ("old"), or the pending change's result
    one generation later ("new"), recorded by one audit entry whose before/after match. Its
    pointers name READY versions. Returns (violations, "old" | "new" | "neither", rollout)."""
    rollout = registry.get_rollout(index)
    now = rollout.pointers()
    problems: list[str] = []
    generation = int(acked["generation"])
    audit = registry.audit_log(index, limit=1)
    last = audit[0] if audit else None
    if now == dict(acked):
        outcome = "old"
    elif pending is not None and rollout.generation == generation + 1:
        outcome = "new"
        if last is None or last.action != pending.action:
            problems.append(f"generation {rollout.generation} was reached by "
                            f"{last.action if last else 'no audit entry'}, not by the pending {pending.action}")
        elif dict(last.before) != dict(acked):
            problems.append(f"audit: {pending.action} started from {dict(last.before)}, not from the "
                            f"acknowledged rollout {dict(acked)}")
        if (wrong := pending.expect(acked, now)) is not None:
            problems.append(f"{pending.action}{dict(pending.arguments)} left {now}: {wrong}")
    else:
        outcome = "neither"
        problems.append(f"rollout is at {now}; expected the acknowledged {dict(acked)}"
                        + (f" or the result of the pending {pending.action}" if pending else
                           " (nothing was pending)"))
    if rollout.generation and (last is None or dict(last.after) != now):
        problems.append(f"the newest audit entry ({last.action if last else None}) does not end at the rollout {now}")
    for role in ("stable", "canary", "shadow"):
        name = now[role]
        if name is not None and registry.get_version(index, name).state is not VersionState.READY:
            problems.append(f"{role} points at {name}, which is {registry.get_version(index, name).state}")
    return problems, outcome, rollout


def expectation(action: str, arguments: Mapping[str, Any]) -> Callable[[Pointers, Pointers], str | None]:
    """What `action` must do to the pointers (the rollout rules, restated independently)."""
    version = arguments.get("version")
    percent = arguments.get("percent")

    def expect(before: Pointers, after: Pointers) -> str | None:
        wants: dict[str, Any] = {
            "set_stable": {"stable": version, "previous_stable": before["stable"]},
            "start_canary": {"stable": before["stable"], "canary": version, "canary_percent": percent},
            "set_canary_percent": {"canary": before["canary"], "canary_percent": percent},
            "set_shadow": {"shadow": version, "shadow_percent": percent},
            "clear_shadow": {"shadow": None, "shadow_percent": 0},
            "promote": {"stable": before["canary"], "previous_stable": before["stable"], "canary": None},
            "rollback": {"stable": before["previous_stable"], "previous_stable": before["stable"], "canary": None},
            "abort_canary": {"stable": before["stable"], "canary": None, "canary_percent": 0},
        }[action]
        if version is None and action == "set_stable":  # a build's activation: the version it made
            wants.pop("stable")
        wrong = {k: after[k] for k, v in wants.items() if after[k] != v}
        return f"expected {wants}, got {wrong}" if wrong else None

    return expect


def check_serving(target: str, index: str, rollout: Rollout, queries: list[str], *,
                  catch_up_s: float = 0.0) -> tuple[list[str], list[str]]:
    """The server at `target` serves `rollout` (its generation, waiting up to catch_up_s for a
    registry poll), reports no load errors, and answers each query from the version its role
    names in that rollout. Returns (violations, versions that answered)."""
    from colgrid_client import Client, ColgridError

    problems: list[str] = []
    served: set[str] = set()
    with Client(target, timeout=30, retries=2) as client:
        deadline = time.monotonic() + catch_up_s
        while True:
            try:
                status = client.get_rollout(index)
            except ColgridError as exc:
                return [f"GetRollout failed: {exc}"], []
            if status.served_generation == rollout.generation or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if status.served_generation != rollout.generation:
            problems.append(f"server serves generation {status.served_generation}, registry is at {rollout.generation}")
        problems += [f"load error: {e.version} {e.check}: {e.message}" for e in status.load_errors]
        for i, query in enumerate(queries):
            try:
                result = client.search(index, query, k=3, routing_key=f"key-{i}")
            except ColgridError as exc:
                problems.append(f"search {query!r} failed: {exc}")
                continue
            served.add(result.version)
            named = rollout.stable if result.role == "stable" else rollout.canary if result.role == "canary" else None
            if result.version != named or result.generation != rollout.generation:
                problems.append(f"{query!r} answered by {result.version} as {result.role!r} of generation "
                                f"{result.generation}; the registry's generation {rollout.generation} names {named}")
            if not result.hits:
                problems.append(f"{query!r} answered with no hits from {result.version}")
    return problems, sorted(served)
