"""Rollout rules: which pointers each operation changes, and when it is refused.

Each rule is a function of the rollout before the change, `rule(before, ready, *arguments)`,
named as the audit log names its action. It returns the fields to change (or None: nothing to
do), or raises. `ready(version, why)` looks a version up inside the caller's transaction and
raises VersionNotFound / VersionNotReady. The Registry runs a rule and `write_rollout` in one
write transaction.

Invariants every rule keeps: canary and shadow never name the stable version; a percent is 0
when its pointer is empty.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, NoReturn

from colgrid_registry import _rows
from colgrid_registry._db import Connection
from colgrid_registry._records import Rollout
from colgrid_registry.errors import GenerationConflict, InvalidTransition

Ready = Callable[[str, str], None]
Changes = dict[str, Any]

_POINTER_READY = "a rollout pointer may only go to a READY version"


def set_stable(before: Rollout, ready: Ready, version: str) -> Changes | None:
    ready(version, _POINTER_READY)
    if before.stable == version:
        return None
    return {"stable": version, "previous_stable": before.stable, **_clear_pointers_to(before, version)}


def start_canary(before: Rollout, ready: Ready, version: str, percent: int) -> Changes:
    ready(version, _POINTER_READY)
    refused = f"cannot start a canary of {version!r} on index {before.index!r}"
    if before.stable is None:
        _refuse(before, f"{refused}: the index has no stable version to compare it with; "
                        f"point stable at a READY version first (set_stable)", version)
    if version == before.stable:
        _refuse(before, f"{refused}: it is already the stable version", version)
    if before.canary is not None:
        _refuse(before, f"{refused}: canary {before.canary!r} is running at {before.canary_percent}%; "
                        f"abort or promote the running canary first", version)
    return {"canary": version, "canary_percent": percent}


def set_canary_percent(before: Rollout, ready: Ready, percent: int) -> Changes:
    _require_canary(before, "cannot set the canary percent")
    return {"canary_percent": percent}


def set_shadow(before: Rollout, ready: Ready, version: str, percent: int) -> Changes:
    ready(version, _POINTER_READY)
    if version == before.stable:
        _refuse(before, f"cannot shadow {version!r} on index {before.index!r}: it is the stable version, "
                        f"which already answers the queries; shadow another READY version", version)
    return {"shadow": version, "shadow_percent": percent}


def clear_shadow(before: Rollout, ready: Ready) -> Changes:
    if before.shadow is None:
        _refuse(before, f"cannot clear the shadow of index {before.index!r}: it has none")
    return {"shadow": None, "shadow_percent": 0}


def promote(before: Rollout, ready: Ready) -> Changes:
    canary = _require_canary(before, "cannot promote")
    ready(canary, "only a READY canary can be promoted; abort the canary (abort_canary)")
    return {"stable": canary, "previous_stable": before.stable, **_clear_pointers_to(before, canary),
            "canary": None, "canary_percent": 0}


def rollback(before: Rollout, ready: Ready) -> Changes:
    """stable <-> previous_stable, so a second rollback undoes the first; any canary ends."""
    target = before.previous_stable
    if target is None:
        _refuse(before, f"cannot roll back index {before.index!r}: it has no previous stable version; "
                        f"point stable at a READY version with set_stable instead")
    ready(target, f"cannot roll back to it (the previous stable version must be READY); point stable "
                  f"at a READY version with set_stable instead")
    return {"stable": target, "previous_stable": before.stable, **_clear_pointers_to(before, target),
            "canary": None, "canary_percent": 0}


def abort_canary(before: Rollout, ready: Ready) -> Changes:
    _require_canary(before, "cannot abort the canary")
    return {"canary": None, "canary_percent": 0}


def write_rollout(conn: Connection, before: Rollout, changes: Changes, *, action: str, actor: str,
                  reason: str) -> Rollout:
    """Write `changes` as the next generation and audit them. The WHERE on generation keeps
    this a compare-and-set even on a database whose reads do not take the write lock."""
    now = _rows.now()
    after = dataclasses.replace(before, **changes, generation=before.generation + 1, updated_at=now)
    pointers = after.pointers()
    assignments = ", ".join(f"{column} = ?" for column in pointers)
    updated = conn.execute(
        f"UPDATE rollouts SET {assignments}, updated_at = ? WHERE index_name = ? AND generation = ?",
        (*pointers.values(), _rows.stamp(now), before.index, before.generation)).rowcount
    if updated != 1:
        actual = _rows.require_rollout(conn, before.index).generation
        raise GenerationConflict(before.index, expected=before.generation, actual=actual)
    conn.execute(
        "INSERT INTO audit_log (id, index_name, at, actor, action, reason, before_json, after_json) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (_rows.next_id(conn, "audit_log"), before.index, _rows.stamp(now), actor, action, reason,
         json.dumps(before.pointers(), sort_keys=True), json.dumps(pointers, sort_keys=True)))
    return after


def _clear_pointers_to(before: Rollout, version: str) -> Changes:
    """The canary/shadow pointers that would name `version` once it becomes stable, emptied."""
    cleared: Changes = {}
    if before.canary == version:
        cleared.update(canary=None, canary_percent=0)
    if before.shadow == version:
        cleared.update(shadow=None, shadow_percent=0)
    return cleared


def _require_canary(before: Rollout, refused: str) -> str:
    if before.canary is None:
        _refuse(before, f"{refused} of index {before.index!r}: it has no canary; "
                        f"start one first (start_canary)")
    return before.canary


def _refuse(before: Rollout, message: str, version: str | None = None) -> NoReturn:
    raise InvalidTransition(message, index=before.index, version=version)
