"""The registry: indexes, their versions (a small state machine), one rollout per index, the
replicas serving them and evaluation results.

Every public method is one transaction: it either happens completely or not at all. Rollout
changes are compare-and-set on `generation` and write their audit entry in the same transaction.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from colgrid_registry import _checks, _rollouts, _rows
from colgrid_registry._db import Connection, Database
from colgrid_registry._names import check_name
from colgrid_registry._records import (
    TRANSITIONS, AuditEntry, EvaluationRecord, IndexRecord, ReplicaRecord, Rollout, VersionRecord,
    VersionState)
from colgrid_registry._schema import migrate
from colgrid_registry._sqlite import SQLiteDatabase, sqlite_path
from colgrid_registry.errors import (
    AlreadyExists, GenerationConflict, InvalidTransition, InvalidValue, VersionNotReady)

_ALLOCATED_NAME = re.compile(r"v([0-9]+)")


def open_registry(url_or_path: str | Path, *, busy_timeout_s: float = 10.0) -> Registry:
    """Open (creating and migrating if needed) the registry at a path or `sqlite:///abs/path.db`."""
    return Registry(sqlite_path(url_or_path), busy_timeout_s=busy_timeout_s)


class Registry:
    def __init__(self, location: str | Path | Database, *, busy_timeout_s: float = 10.0) -> None:
        """A path opens SQLite; any other `Database` (see `_db`) is used as given and closed
        with the registry."""
        if isinstance(location, (str, Path)):
            location = SQLiteDatabase(Path(location), busy_timeout_s=busy_timeout_s)
        self._db = location
        try:
            with self._db.transaction(write=True) as conn:
                migrate(conn)
        except BaseException:
            self._db.close()
            raise

    @property
    def path(self) -> Path | None:
        """The SQLite file, or None when the registry lives in a database server."""
        return getattr(self._db, "path", None)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self._db.location!r})"

    # -- indexes ---------------------------------------------------------------------------------

    def create_index(self, name: str) -> IndexRecord:
        check_name(name, kind="index")
        with self._db.transaction(write=True) as conn:
            if _rows.index_row(conn, name) is not None:
                raise AlreadyExists(f"index {name!r} already exists", resource_type="index",
                                    resource_name=name)
            return _insert_index(conn, name)

    def ensure_index(self, name: str) -> IndexRecord:
        """The index `name`, created (with an empty rollout) if it does not exist yet."""
        check_name(name, kind="index")
        with self._db.transaction(write=True) as conn:
            row = _rows.index_row(conn, name)
            return _rows.index(row) if row is not None else _insert_index(conn, name)

    def get_index(self, name: str) -> IndexRecord:
        check_name(name, kind="index")
        with self._db.transaction(write=False) as conn:
            return _rows.index(_rows.require_index(conn, name))

    def list_indexes(self) -> list[IndexRecord]:
        with self._db.transaction(write=False) as conn:
            return [_rows.index(row) for row in conn.execute("SELECT * FROM indexes ORDER BY name")]

    # -- versions --------------------------------------------------------------------------------

    def allocate_version(self, index: str, *, encoder_id: str, encoder_kind: str, dim: int,
                         storage_uri: str | None, build_params: Mapping[str, Any]) -> VersionRecord:
        """A new BUILDING version named v<N+1>, N the highest v<number> of the index so far.
        The write lock is held from reading N to inserting, so concurrent callers never collide.
        `storage_uri` may be None or "" when the location depends on the name: give it to
        mark_ready then."""
        check_name(index, kind="index")
        values = _checks.new_version_values(encoder_id, encoder_kind, dim, storage_uri, build_params)
        with self._db.transaction(write=True) as conn:
            _rows.require_index(conn, index)
            taken = conn.execute("SELECT name FROM versions WHERE index_name = ?", (index,))
            numbers = (int(m.group(1)) for row in taken if (m := _ALLOCATED_NAME.fullmatch(row["name"])))
            return _insert_version(conn, index, f"v{max(numbers, default=0) + 1}", values)

    def create_version(self, index: str, version: str, *, encoder_id: str, encoder_kind: str,
                       dim: int, storage_uri: str | None, build_params: Mapping[str, Any]) -> VersionRecord:
        """A new BUILDING version with an explicit name (AlreadyExists if the index has it)."""
        check_name(index, kind="index")
        check_name(version, kind="version")
        values = _checks.new_version_values(encoder_id, encoder_kind, dim, storage_uri, build_params)
        with self._db.transaction(write=True) as conn:
            _rows.require_index(conn, index)
            if _rows.version_row(conn, index, version) is not None:
                raise AlreadyExists(f"index {index!r} already has a version {version!r}",
                                    resource_type="index-version", resource_name=f"{index}/{version}")
            return _insert_version(conn, index, version, values)

    def mark_ready(self, index: str, version: str, *, documents: int, tokens: int,
                   manifest_sha256: str, storage_uri: str | None = None) -> VersionRecord:
        """BUILDING -> READY once the version is published; `storage_uri` replaces the one given
        at allocation and is required if none was given then."""
        changes: dict[str, Any] = {
            "documents": _checks.count(documents, "documents"),
            "tokens": _checks.count(tokens, "tokens"),
            "manifest_sha256": _checks.sha256(manifest_sha256),
        }
        if storage_uri is not None:
            changes["storage_uri"] = _checks.text(storage_uri, "storage_uri")
        return self._transition(index, version, VersionState.READY, changes)

    def mark_failed(self, index: str, version: str, error: str) -> VersionRecord:
        """BUILDING -> FAILED, keeping `error` for whoever looks at the version later."""
        return self._transition(index, version, VersionState.FAILED, {"error": _checks.text(error, "error")})

    def mark_retired(self, index: str, version: str) -> VersionRecord:
        """READY -> RETIRED. Refused while the stable, canary or shadow pointer names the version
        (previous_stable may be retired: a later rollback onto it is then refused)."""
        return self._transition(index, version, VersionState.RETIRED, {})

    def get_version(self, index: str, version: str) -> VersionRecord:
        check_name(index, kind="index")
        check_name(version, kind="version")
        with self._db.transaction(write=False) as conn:
            return _rows.version(_rows.require_version(conn, index, version))

    def list_versions(self, index: str) -> list[VersionRecord]:
        """All versions of `index`, oldest first."""
        check_name(index, kind="index")
        with self._db.transaction(write=False) as conn:
            _rows.require_index(conn, index)
            rows = conn.execute("SELECT * FROM versions WHERE index_name = ? ORDER BY seq", (index,))
            return [_rows.version(row) for row in rows]

    def latest_ready(self, index: str) -> VersionRecord | None:
        """The most recently created READY version, or None."""
        check_name(index, kind="index")
        with self._db.transaction(write=False) as conn:
            _rows.require_index(conn, index)
            row = conn.execute("SELECT * FROM versions WHERE index_name = ? AND state = ? "
                               "ORDER BY seq DESC LIMIT 1", (index, VersionState.READY.value)).fetchone()
            return None if row is None else _rows.version(row)

    def _transition(self, index: str, version: str, target: VersionState,
                    changes: dict[str, Any]) -> VersionRecord:
        check_name(index, kind="index")
        check_name(version, kind="version")
        with self._db.transaction(write=True) as conn:
            row = _rows.require_version(conn, index, version)
            current = VersionState(row["state"])
            if target not in TRANSITIONS[current]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none, it is final"
                raise InvalidTransition(f"version {version!r} of index {index!r} is {current}; it cannot "
                                        f"become {target} (allowed from {current}: {allowed})",
                                        index=index, version=version)
            if target is VersionState.RETIRED:
                serving = [r for r in _rows.require_rollout(conn, index).roles(version) if r != "previous"]
                if serving:
                    raise InvalidTransition(f"version {version!r} is the {' and '.join(serving)} version of "
                                            f"index {index!r}; point the rollout elsewhere before retiring it",
                                            index=index, version=version)
            if target is VersionState.READY and row["storage_uri"] is None and "storage_uri" not in changes:
                raise InvalidValue(f"version {version!r} of index {index!r} has no storage_uri yet; "
                                   f"pass storage_uri= to mark_ready", field="storage_uri")
            columns = {"state": target.value, "updated_at": _rows.stamp(_rows.now()), **changes}
            assignments = ", ".join(f"{column} = ?" for column in columns)
            conn.execute(f"UPDATE versions SET {assignments} WHERE index_name = ? AND name = ?",
                         (*columns.values(), index, version))
            return _rows.version(_rows.require_version(conn, index, version))

    # -- rollouts --------------------------------------------------------------------------------
    # Each change: one write transaction; GenerationConflict if `expected_generation` is given and
    # differs; otherwise the next generation, one audit entry (action = the method's name), and
    # the new Rollout returned. The rules and their refusals live in `_rollouts`.

    def get_rollout(self, index: str) -> Rollout:
        check_name(index, kind="index")
        with self._db.transaction(write=False) as conn:
            return _rows.require_rollout(conn, index)

    def set_stable(self, index: str, version: str, *, expected_generation: int | None = None,
                   actor: str = "system", reason: str = "") -> Rollout:
        """Point `stable` at a READY version; the old stable becomes previous_stable, and a canary
        or shadow naming `version` is cleared. Setting the current stable again changes nothing
        (no new generation, no audit)."""
        check_name(version, kind="version")
        return self._change_rollout(index, _rollouts.set_stable, version,
                                    expected_generation=expected_generation, actor=actor, reason=reason)

    def start_canary(self, index: str, version: str, percent: int, *, expected_generation: int | None = None,
                     actor: str = "system", reason: str = "") -> Rollout:
        """Send `percent`% of the traffic to a READY `version` beside stable. Refused when the
        index has no stable, `version` is the stable, or a canary is already running."""
        check_name(version, kind="version")
        return self._change_rollout(index, _rollouts.start_canary, version, _checks.percent(percent),
                                    expected_generation=expected_generation, actor=actor, reason=reason)

    def set_canary_percent(self, index: str, percent: int, *, expected_generation: int | None = None,
                           actor: str = "system", reason: str = "") -> Rollout:
        """Change the running canary's share of the traffic (0..100)."""
        return self._change_rollout(index, _rollouts.set_canary_percent, _checks.percent(percent),
                                    expected_generation=expected_generation, actor=actor, reason=reason)

    def set_shadow(self, index: str, version: str, percent: int = 100, *,
                   expected_generation: int | None = None, actor: str = "system", reason: str = "") -> Rollout:
        """Mirror `percent`% of the queries to a READY `version` (not the stable), replacing any
        shadow; its answers are never returned."""
        check_name(version, kind="version")
        return self._change_rollout(index, _rollouts.set_shadow, version, _checks.percent(percent),
                                    expected_generation=expected_generation, actor=actor, reason=reason)

    def clear_shadow(self, index: str, *, expected_generation: int | None = None, actor: str = "system",
                     reason: str = "") -> Rollout:
        return self._change_rollout(index, _rollouts.clear_shadow, expected_generation=expected_generation,
                                    actor=actor, reason=reason)

    def promote(self, index: str, *, expected_generation: int | None = None, actor: str = "system",
                reason: str = "") -> Rollout:
        """canary -> stable; the old stable becomes previous_stable; the canary (and a shadow of
        the promoted version) is cleared."""
        return self._change_rollout(index, _rollouts.promote, expected_generation=expected_generation,
                                    actor=actor, reason=reason)

    def rollback(self, index: str, *, expected_generation: int | None = None, actor: str = "system",
                 reason: str = "") -> Rollout:
        """stable <-> previous_stable (a second rollback undoes the first) and any canary ends.
        Refused (VersionNotReady) when previous_stable has been retired since."""
        return self._change_rollout(index, _rollouts.rollback, expected_generation=expected_generation,
                                    actor=actor, reason=reason)

    def abort_canary(self, index: str, *, expected_generation: int | None = None, actor: str = "system",
                     reason: str = "") -> Rollout:
        """End the canary: all traffic back to stable."""
        return self._change_rollout(index, _rollouts.abort_canary, expected_generation=expected_generation,
                                    actor=actor, reason=reason)

    def audit_log(self, index: str, limit: int = 100) -> list[AuditEntry]:
        """The rollout changes of `index`, newest first."""
        check_name(index, kind="index")
        limit = _checks.count(limit, "limit", minimum=1)
        with self._db.transaction(write=False) as conn:
            _rows.require_index(conn, index)
            rows = conn.execute("SELECT * FROM audit_log WHERE index_name = ? ORDER BY id DESC LIMIT ?",
                                (index, limit))
            return [_rows.audit(row) for row in rows]

    def _change_rollout(self, index: str, rule: Callable[..., _rollouts.Changes | None], *arguments: Any,
                        expected_generation: int | None, actor: str, reason: str) -> Rollout:
        check_name(index, kind="index")
        expected = _checks.expected_generation(expected_generation)
        actor, reason = _checks.audit_fields(actor, reason)
        with self._db.transaction(write=True) as conn:
            before = _rows.require_rollout(conn, index)
            if expected is not None and expected != before.generation:
                raise GenerationConflict(index, expected=expected, actual=before.generation)

            def ready(version: str, why: str) -> None:
                state = _rows.version_state(conn, index, version)
                if state is not VersionState.READY:
                    raise VersionNotReady(index, version, state.value, why=why)

            changes = rule(before, ready, *arguments)
            if changes is None:
                return before
            return _rollouts.write_rollout(conn, before, changes, action=rule.__name__, actor=actor,
                                          reason=reason)

    # -- replicas --------------------------------------------------------------------------------

    def heartbeat(self, replica_id: str, *, address: str, served: Mapping[str, int]) -> None:
        """Record that `replica_id` (at `address`) is alive and serves `served` = {index:
        generation applied}. Replaces what it reported before."""
        values = (_checks.text(replica_id, "replica_id"), _checks.text(address, "address"),
                  _checks.served(served), _rows.stamp(_rows.now()))
        with self._db.transaction(write=True) as conn:
            conn.execute("INSERT INTO replicas (replica_id, address, served_json, last_seen) "
                         "VALUES (?, ?, ?, ?) ON CONFLICT (replica_id) DO UPDATE SET "
                         "address = excluded.address, served_json = excluded.served_json, "
                         "last_seen = excluded.last_seen", values)

    def list_replicas(self, *, live_within_s: float = 30.0) -> list[ReplicaRecord]:
        """Every replica that has sent a heartbeat and not been forgotten, by id; `live` when its
        last heartbeat is at most `live_within_s` old by this process's clock."""
        window = _checks.positive_seconds(live_within_s, "live_within_s")
        with self._db.transaction(write=False) as conn:
            rows = list(conn.execute("SELECT * FROM replicas ORDER BY replica_id"))
        as_of = _rows.now()
        return [_rows.replica(row, as_of=as_of, live_within_s=window) for row in rows]

    def forget_replica(self, replica_id: str) -> bool:
        """Drop a replica (one that is gone for good); False when there was none of that id."""
        replica_id = _checks.text(replica_id, "replica_id")
        with self._db.transaction(write=True) as conn:
            return conn.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,)).rowcount == 1

    def forget_stale_replicas(self, *, older_than_s: float) -> list[str]:
        """Drop every replica whose last heartbeat is more than `older_than_s` old (a killed
        process never removes itself, and pods come and go under new names); their ids, sorted."""
        window = _checks.positive_seconds(older_than_s, "older_than_s")
        # Stamps are fixed-width UTC ISO-8601 text: they order as the moments they name.
        cutoff = _rows.stamp(_rows.now() - timedelta(seconds=window))
        with self._db.transaction(write=True) as conn:
            stale = [row["replica_id"] for row in
                     conn.execute("SELECT replica_id FROM replicas WHERE last_seen < ? ORDER BY replica_id", (cutoff,))]
            if stale:
                conn.execute("DELETE FROM replicas WHERE last_seen < ?", (cutoff,))
        return stale

    # -- evaluations -----------------------------------------------------------------------------

    def record_evaluation(self, index: str, version: str, *, metrics: Mapping[str, float], query_set: str,
                          actor: str = "system") -> EvaluationRecord:
        """Store one evaluation of a READY (or since retired) version: `metrics` maps a metric
        name (e.g. "ndcg@10") to its value on the query set named `query_set`."""
        check_name(index, kind="index")
        check_name(version, kind="version")
        metrics_json = _checks.metrics(metrics)
        query_set = _checks.text(query_set, "query_set")
        actor = _checks.text(actor, "actor")
        with self._db.transaction(write=True) as conn:
            state = _rows.version_state(conn, index, version)
            if state not in (VersionState.READY, VersionState.RETIRED):
                raise VersionNotReady(index, version, state.value,
                                      why="only a READY version can be evaluated; wait for its build to finish")
            new_id = _rows.next_id(conn, "evaluations")
            conn.execute("INSERT INTO evaluations (id, index_name, version, query_set, metrics_json, at, "
                         "actor) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (new_id, index, version, query_set, metrics_json, _rows.stamp(_rows.now()), actor))
            row = conn.execute("SELECT * FROM evaluations WHERE id = ?", (new_id,)).fetchone()
            return _rows.evaluation(row)

    def evaluations(self, index: str, version: str) -> list[EvaluationRecord]:
        """The evaluations stored for `version`, newest first."""
        check_name(index, kind="index")
        check_name(version, kind="version")
        with self._db.transaction(write=False) as conn:
            _rows.require_version(conn, index, version)
            rows = conn.execute("SELECT * FROM evaluations WHERE index_name = ? AND version = ? "
                                "ORDER BY id DESC", (index, version))
            return [_rows.evaluation(row) for row in rows]


def _insert_index(conn: Connection, name: str) -> IndexRecord:
    stamp = _rows.stamp(_rows.now())
    conn.execute("INSERT INTO indexes (name, created_at) VALUES (?, ?)", (name, stamp))
    conn.execute("INSERT INTO rollouts (index_name, canary_percent, shadow_percent, generation, "
                 "updated_at) VALUES (?, 0, 0, 0, ?)", (name, stamp))
    return _rows.index(_rows.require_index(conn, name))


def _insert_version(conn: Connection, index: str, version: str, values: dict[str, Any]) -> VersionRecord:
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS next_seq FROM versions WHERE index_name = ?",
                       (index,)).fetchone()["next_seq"]
    stamp = _rows.stamp(_rows.now())
    columns = {"index_name": index, "name": version, "seq": seq, "state": VersionState.BUILDING.value,
               **values, "created_at": stamp, "updated_at": stamp}
    conn.execute(f"INSERT INTO versions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                 tuple(columns.values()))
    return _rows.version(_rows.require_version(conn, index, version))
