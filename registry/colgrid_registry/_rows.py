"""Rows <-> records, and the lookups every operation starts with. Module level: they only need
a connection inside a transaction the caller holds."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from colgrid_registry._db import Connection, Row
from colgrid_registry._records import (
    AuditEntry, EvaluationRecord, IndexRecord, ReplicaRecord, Rollout, VersionRecord, VersionState)
from colgrid_registry.errors import IndexNotFound, VersionNotFound


def now() -> datetime:
    return datetime.now(timezone.utc)


def stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def next_id(conn: Connection, table: str) -> int:
    """Explicit ids (no AUTOINCREMENT / SERIAL, for one schema on both backends); safe because
    write transactions exclude each other."""
    return int(conn.execute(f"SELECT COALESCE(MAX(id), 0) + 1 AS next_id FROM {table}").fetchone()["next_id"])


# -- lookups -------------------------------------------------------------------------------------

def index_row(conn: Connection, name: str) -> Row | None:
    return conn.execute("SELECT * FROM indexes WHERE name = ?", (name,)).fetchone()


def require_index(conn: Connection, name: str) -> Row:
    row = index_row(conn, name)
    if row is None:
        raise IndexNotFound(name)
    return row


def version_row(conn: Connection, index: str, version: str) -> Row | None:
    return conn.execute("SELECT * FROM versions WHERE index_name = ? AND name = ?",
                        (index, version)).fetchone()


def require_version(conn: Connection, index: str, version: str) -> Row:
    row = version_row(conn, index, version)
    if row is None:
        require_index(conn, index)
        raise VersionNotFound(index, version)
    return row


def version_state(conn: Connection, index: str, version: str) -> VersionState:
    return VersionState(require_version(conn, index, version)["state"])


def require_rollout(conn: Connection, index: str) -> Rollout:
    row = conn.execute("SELECT * FROM rollouts WHERE index_name = ?", (index,)).fetchone()
    if row is None:  # every index gets its rollout in the same transaction
        raise IndexNotFound(index)
    return rollout(row)


# -- records -------------------------------------------------------------------------------------

def index(row: Row) -> IndexRecord:
    return IndexRecord(name=row["name"], created_at=moment(row["created_at"]))


def version(row: Row) -> VersionRecord:
    return VersionRecord(
        index=row["index_name"], version=row["name"], state=VersionState(row["state"]),
        encoder_id=row["encoder_id"], encoder_kind=row["encoder_kind"], dim=row["dim"],
        documents=row["documents"], tokens=row["tokens"], storage_uri=row["storage_uri"],
        build_params=json.loads(row["build_params"]), manifest_sha256=row["manifest_sha256"],
        created_at=moment(row["created_at"]), updated_at=moment(row["updated_at"]), error=row["error"])


def rollout(row: Row) -> Rollout:
    return Rollout(
        index=row["index_name"], stable=row["stable"], canary=row["canary"],
        canary_percent=row["canary_percent"], shadow=row["shadow"], shadow_percent=row["shadow_percent"],
        previous_stable=row["previous_stable"], generation=row["generation"],
        updated_at=moment(row["updated_at"]))


def audit(row: Row) -> AuditEntry:
    return AuditEntry(id=row["id"], index=row["index_name"], at=moment(row["at"]), actor=row["actor"],
                      action=row["action"], reason=row["reason"], before=json.loads(row["before_json"]),
                      after=json.loads(row["after_json"]))


def replica(row: Row, *, as_of: datetime, live_within_s: float) -> ReplicaRecord:
    last_seen = moment(row["last_seen"])
    return ReplicaRecord(replica_id=row["replica_id"], address=row["address"], last_seen=last_seen,
                         served=json.loads(row["served_json"]),
                         live=(as_of - last_seen).total_seconds() <= live_within_s)


def evaluation(row: Row) -> EvaluationRecord:
    return EvaluationRecord(id=row["id"], index=row["index_name"], version=row["version"],
                            query_set=row["query_set"], metrics=json.loads(row["metrics_json"]),
                            at=moment(row["at"]), actor=row["actor"])
