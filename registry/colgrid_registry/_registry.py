"""The registry: indexes, their versions (a small state machine) and one rollout per index.

Every public method is one transaction: it either happens completely or not at all. Rollout
changes are compare-and-set on `generation` and write their audit entry in the same transaction.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from colgrid_registry._names import check_name
from colgrid_registry._records import (
    TRANSITIONS, AuditEntry, IndexRecord, Rollout, VersionRecord, VersionState)
from colgrid_registry._schema import migrate
from colgrid_registry._sqlite import Database, sqlite_path
from colgrid_registry.errors import (
    AlreadyExists, IndexNotFound, InvalidTransition, InvalidValue, GenerationConflict,
    VersionNotFound, VersionNotReady)

_ALLOCATED_NAME = re.compile(r"v([0-9]+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def open_registry(url_or_path: str | Path, *, busy_timeout_s: float = 10.0) -> Registry:
    """Open (creating and migrating if needed) the registry at a path or `sqlite:///abs/path.db`."""
    return Registry(sqlite_path(url_or_path), busy_timeout_s=busy_timeout_s)


class Registry:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        self._db = Database(Path(path), busy_timeout_s=busy_timeout_s)
        try:
            with self._db.transaction(write=True) as conn:
                migrate(conn)
        except BaseException:
            self._db.close()
            raise

    @property
    def path(self) -> Path:
        return self._db.path

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.path)!r})"

    # -- indexes ---------------------------------------------------------------------------------

    def create_index(self, name: str) -> IndexRecord:
        check_name(name, kind="index")
        with self._db.transaction(write=True) as conn:
            if _index_row(conn, name) is not None:
                raise AlreadyExists(f"index {name!r} already exists", resource_type="index",
                                    resource_name=name)
            return _insert_index(conn, name)

    def ensure_index(self, name: str) -> IndexRecord:
        """The index `name`, created (with an empty rollout) if it does not exist yet."""
        check_name(name, kind="index")
        with self._db.transaction(write=True) as conn:
            row = _index_row(conn, name)
            return _index(row) if row is not None else _insert_index(conn, name)

    def get_index(self, name: str) -> IndexRecord:
        check_name(name, kind="index")
        with self._db.transaction(write=False) as conn:
            return _index(_require_index(conn, name))

    def list_indexes(self) -> list[IndexRecord]:
        with self._db.transaction(write=False) as conn:
            return [_index(row) for row in conn.execute("SELECT * FROM indexes ORDER BY name")]

    # -- versions --------------------------------------------------------------------------------

    def allocate_version(self, index: str, *, encoder_id: str, encoder_kind: str, dim: int,
                         storage_uri: str | None, build_params: Mapping[str, Any]) -> VersionRecord:
        """A new BUILDING version named v<N+1>, N the highest v<number> of the index so far.
        The write lock is held from reading N to inserting, so concurrent callers never collide.
        `storage_uri` may be None or "" when the location depends on the name: give it to
        mark_ready then."""
        check_name(index, kind="index")
        values = _new_version_values(encoder_id, encoder_kind, dim, storage_uri, build_params)
        with self._db.transaction(write=True) as conn:
            _require_index(conn, index)
            taken = conn.execute("SELECT name FROM versions WHERE index_name = ?", (index,))
            numbers = (int(m.group(1)) for (name,) in taken if (m := _ALLOCATED_NAME.fullmatch(name)))
            return _insert_version(conn, index, f"v{max(numbers, default=0) + 1}", values)

    def create_version(self, index: str, version: str, *, encoder_id: str, encoder_kind: str,
                       dim: int, storage_uri: str | None, build_params: Mapping[str, Any]) -> VersionRecord:
        """A new BUILDING version with an explicit name (AlreadyExists if the index has it)."""
        check_name(index, kind="index")
        check_name(version, kind="version")
        values = _new_version_values(encoder_id, encoder_kind, dim, storage_uri, build_params)
        with self._db.transaction(write=True) as conn:
            _require_index(conn, index)
            if _version_row(conn, index, version) is not None:
                raise AlreadyExists(f"index {index!r} already has a version {version!r}",
                                    resource_type="index-version", resource_name=f"{index}/{version}")
            return _insert_version(conn, index, version, values)

    def mark_ready(self, index: str, version: str, *, documents: int, tokens: int,
                   manifest_sha256: str, storage_uri: str | None = None) -> VersionRecord:
        """BUILDING -> READY once the version is published; `storage_uri` replaces the one given
        at allocation and is required if none was given then."""
        changes: dict[str, Any] = {
            "documents": _count(documents, "documents"),
            "tokens": _count(tokens, "tokens"),
            "manifest_sha256": _sha256(manifest_sha256),
        }
        if storage_uri is not None:
            changes["storage_uri"] = _text(storage_uri, "storage_uri")
        return self._transition(index, version, VersionState.READY, changes)

    def mark_failed(self, index: str, version: str, error: str) -> VersionRecord:
        """BUILDING -> FAILED, keeping `error` for whoever looks at the version later."""
        return self._transition(index, version, VersionState.FAILED, {"error": _text(error, "error")})

    def mark_retired(self, index: str, version: str) -> VersionRecord:
        """READY -> RETIRED. Refused while the stable, canary or shadow pointer names the version
        (previous_stable may be retired: a later rollback onto it is then refused)."""
        return self._transition(index, version, VersionState.RETIRED, {})

    def get_version(self, index: str, version: str) -> VersionRecord:
        check_name(index, kind="index")
        check_name(version, kind="version")
        with self._db.transaction(write=False) as conn:
            return _version(_require_version(conn, index, version))

    def list_versions(self, index: str) -> list[VersionRecord]:
        """All versions of `index`, oldest first."""
        check_name(index, kind="index")
        with self._db.transaction(write=False) as conn:
            _require_index(conn, index)
            rows = conn.execute("SELECT * FROM versions WHERE index_name = ? ORDER BY seq", (index,))
            return [_version(row) for row in rows]

    def latest_ready(self, index: str) -> VersionRecord | None:
        """The most recently created READY version, or None."""
        check_name(index, kind="index")
        with self._db.transaction(write=False) as conn:
            _require_index(conn, index)
            row = conn.execute("SELECT * FROM versions WHERE index_name = ? AND state = ? "
                               "ORDER BY seq DESC LIMIT 1", (index, VersionState.READY.value)).fetchone()
            return None if row is None else _version(row)

    def _transition(self, index: str, version: str, target: VersionState,
                    changes: dict[str, Any]) -> VersionRecord:
        check_name(index, kind="index")
        check_name(version, kind="version")
        with self._db.transaction(write=True) as conn:
            row = _require_version(conn, index, version)
            current = VersionState(row["state"])
            if target not in TRANSITIONS[current]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none, it is final"
                raise InvalidTransition(f"version {version!r} of index {index!r} is {current}; it cannot "
                                        f"become {target} (allowed from {current}: {allowed})",
                                        index=index, version=version)
            if target is VersionState.RETIRED:
                serving = [r for r in _rollout(_require_rollout(conn, index)).roles(version) if r != "previous"]
                if serving:
                    raise InvalidTransition(f"version {version!r} is the {' and '.join(serving)} version of "
                                            f"index {index!r}; point the rollout elsewhere before retiring it",
                                            index=index, version=version)
            if target is VersionState.READY and row["storage_uri"] is None and "storage_uri" not in changes:
                raise InvalidValue(f"version {version!r} of index {index!r} has no storage_uri yet; "
                                   f"pass storage_uri= to mark_ready", field="storage_uri")
            columns = {"state": target.value, "updated_at": _stamp(_now()), **changes}
            assignments = ", ".join(f"{column} = ?" for column in columns)
            conn.execute(f"UPDATE versions SET {assignments} WHERE index_name = ? AND name = ?",
                         (*columns.values(), index, version))
            return _version(_require_version(conn, index, version))

    # -- rollouts --------------------------------------------------------------------------------

    def get_rollout(self, index: str) -> Rollout:
        check_name(index, kind="index")
        with self._db.transaction(write=False) as conn:
            return _rollout(_require_rollout(conn, index))

    def set_stable(self, index: str, version: str, *, expected_generation: int | None = None,
                   actor: str = "system", reason: str = "") -> Rollout:
        """Point `stable` at a READY version; the old stable becomes previous_stable. With
        `expected_generation`, refuse (GenerationConflict) if the rollout changed since it was
        read. Setting the current stable again changes nothing (no new generation, no audit)."""
        check_name(index, kind="index")
        check_name(version, kind="version")
        if expected_generation is not None:
            _count(expected_generation, "expected_generation")
        with self._db.transaction(write=True) as conn:
            before = _rollout(_require_rollout(conn, index))
            if expected_generation is not None and expected_generation != before.generation:
                raise GenerationConflict(index, expected=expected_generation, actual=before.generation)
            state = VersionState(_require_version(conn, index, version)["state"])
            if state is not VersionState.READY:
                raise VersionNotReady(index, version, state.value)
            if before.stable == version:
                return before
            return _update_rollout(conn, before, action="set_stable", actor=actor, reason=reason,
                                   stable=version, previous_stable=before.stable)

    def audit_log(self, index: str, limit: int = 100) -> list[AuditEntry]:
        """The rollout changes of `index`, newest first."""
        check_name(index, kind="index")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidValue(f"limit must be a positive integer, got {limit!r}", field="limit")
        with self._db.transaction(write=False) as conn:
            _require_index(conn, index)
            rows = conn.execute("SELECT * FROM audit_log WHERE index_name = ? ORDER BY id DESC LIMIT ?",
                                (index, limit))
            return [_audit(row) for row in rows]


# -- rows <-> records (module level: they only need a connection) --------------------------------

def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _index_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM indexes WHERE name = ?", (name,)).fetchone()


def _require_index(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row = _index_row(conn, name)
    if row is None:
        raise IndexNotFound(name)
    return row


def _version_row(conn: sqlite3.Connection, index: str, version: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM versions WHERE index_name = ? AND name = ?",
                        (index, version)).fetchone()


def _require_version(conn: sqlite3.Connection, index: str, version: str) -> sqlite3.Row:
    row = _version_row(conn, index, version)
    if row is None:
        _require_index(conn, index)
        raise VersionNotFound(index, version)
    return row


def _require_rollout(conn: sqlite3.Connection, index: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM rollouts WHERE index_name = ?", (index,)).fetchone()
    if row is None:  # every index gets its rollout in the same transaction
        raise IndexNotFound(index)
    return row


def _insert_index(conn: sqlite3.Connection, name: str) -> IndexRecord:
    stamp = _stamp(_now())
    conn.execute("INSERT INTO indexes (name, created_at) VALUES (?, ?)", (name, stamp))
    conn.execute("INSERT INTO rollouts (index_name, canary_percent, shadow_percent, generation, "
                 "updated_at) VALUES (?, 0, 0, 0, ?)", (name, stamp))
    return _index(_require_index(conn, name))


def _insert_version(conn: sqlite3.Connection, index: str, version: str,
                    values: dict[str, Any]) -> VersionRecord:
    (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions WHERE index_name = ?",
                          (index,)).fetchone()
    stamp = _stamp(_now())
    columns = {"index_name": index, "name": version, "seq": seq, "state": VersionState.BUILDING.value,
               **values, "created_at": stamp, "updated_at": stamp}
    conn.execute(f"INSERT INTO versions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                 tuple(columns.values()))
    return _version(_require_version(conn, index, version))


def _update_rollout(conn: sqlite3.Connection, before: Rollout, *, action: str, actor: str,
                    reason: str, **changes: Any) -> Rollout:
    """Write `changes` as the next generation and audit them. The WHERE on generation keeps
    this a compare-and-set even on a database whose reads do not take the write lock."""
    actor = _text(actor, "actor")
    if not isinstance(reason, str):
        raise InvalidValue(f"reason must be a string, got {type(reason).__name__}", field="reason")
    now = _now()
    after = dataclasses.replace(before, **changes, generation=before.generation + 1, updated_at=now)
    pointers = after.pointers()
    assignments = ", ".join(f"{column} = ?" for column in pointers)
    updated = conn.execute(
        f"UPDATE rollouts SET {assignments}, updated_at = ? WHERE index_name = ? AND generation = ?",
        (*pointers.values(), _stamp(now), before.index, before.generation)).rowcount
    if updated != 1:
        actual = _rollout(_require_rollout(conn, before.index)).generation
        raise GenerationConflict(before.index, expected=before.generation, actual=actual)
    conn.execute(
        "INSERT INTO audit_log (id, index_name, at, actor, action, reason, before_json, after_json) "
        "SELECT COALESCE(MAX(id), 0) + 1, ?, ?, ?, ?, ?, ?, ? FROM audit_log",
        (before.index, _stamp(now), actor, action, reason,
         json.dumps(before.pointers(), sort_keys=True), json.dumps(pointers, sort_keys=True)))
    return after


def _index(row: sqlite3.Row) -> IndexRecord:
    return IndexRecord(name=row["name"], created_at=_moment(row["created_at"]))


def _version(row: sqlite3.Row) -> VersionRecord:
    return VersionRecord(
        index=row["index_name"], version=row["name"], state=VersionState(row["state"]),
        encoder_id=row["encoder_id"], encoder_kind=row["encoder_kind"], dim=row["dim"],
        documents=row["documents"], tokens=row["tokens"], storage_uri=row["storage_uri"],
        build_params=json.loads(row["build_params"]), manifest_sha256=row["manifest_sha256"],
        created_at=_moment(row["created_at"]), updated_at=_moment(row["updated_at"]), error=row["error"])


def _rollout(row: sqlite3.Row) -> Rollout:
    return Rollout(
        index=row["index_name"], stable=row["stable"], canary=row["canary"],
        canary_percent=row["canary_percent"], shadow=row["shadow"], shadow_percent=row["shadow_percent"],
        previous_stable=row["previous_stable"], generation=row["generation"],
        updated_at=_moment(row["updated_at"]))


def _audit(row: sqlite3.Row) -> AuditEntry:
    return AuditEntry(id=row["id"], index=row["index_name"], at=_moment(row["at"]), actor=row["actor"],
                      action=row["action"], reason=row["reason"], before=json.loads(row["before_json"]),
                      after=json.loads(row["after_json"]))


# -- argument checks (before any transaction starts) ---------------------------------------------

def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"{field} must be a non-empty string, got {value!r}", field=field)
    return value


def _count(value: object, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValue(f"{field} must be an integer >= {minimum}, got {value!r}", field=field)
    return value


def _sha256(value: object) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidValue(f"manifest_sha256 must be 64 lowercase hex digits, got {value!r}",
                           field="manifest_sha256")
    return value


def _new_version_values(encoder_id: str, encoder_kind: str, dim: int, storage_uri: str | None,
                        build_params: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(build_params, Mapping):
        raise InvalidValue(f"build_params must be a mapping, got {type(build_params).__name__}",
                           field="build_params")
    try:
        params = json.dumps(dict(build_params), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"build_params must be JSON-serialisable: {exc}", field="build_params") from exc
    return {"encoder_id": _text(encoder_id, "encoder_id"), "encoder_kind": _text(encoder_kind, "encoder_kind"),
            "dim": _count(dim, "dim", minimum=1),
            "storage_uri": _text(storage_uri, "storage_uri") if storage_uri else None,
            "build_params": params}
