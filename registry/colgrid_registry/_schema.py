"""Schema migrations: an ordered list of SQL statements, applied inside the opener's transaction.

One text for SQLite and PostgreSQL: plain types (TEXT, INTEGER, BIGINT), timestamps as
ISO-8601 UTC text, JSON as text, explicit ids (no AUTOINCREMENT / SERIAL), no STRICT / WITHOUT
ROWID / partial indexes, `?` placeholders. The PostgreSQL backend translates on the way: `?` to
`%s`, and the type TEXT in CREATE/ALTER TABLE to `TEXT COLLATE "C"`, so that names sort
bytewise as in SQLite (hence no column may be named "text"). Write nothing that needs more.
Both backends run the migrations inside their exclusive write transaction, so replicas starting
together migrate once. Never edit a migration that has shipped; append a new one.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from colgrid_registry._db import Connection
from colgrid_registry.errors import IncompatibleSchema


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_POINTER_FKS = ",\n".join(
    f"    FOREIGN KEY (index_name, {column}) REFERENCES versions (index_name, name)"
    for column in ("stable", "canary", "shadow", "previous_stable"))

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "catalog: indexes and their versions", (
        """CREATE TABLE indexes (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
)""",
        """CREATE TABLE versions (
    index_name TEXT NOT NULL REFERENCES indexes (name),
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('BUILDING', 'READY', 'FAILED', 'RETIRED')),
    encoder_id TEXT NOT NULL,
    encoder_kind TEXT NOT NULL,
    dim INTEGER NOT NULL,
    documents BIGINT,
    tokens BIGINT,
    storage_uri TEXT,
    build_params TEXT NOT NULL,
    manifest_sha256 TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    error TEXT,
    PRIMARY KEY (index_name, name),
    UNIQUE (index_name, seq)
)""",
    )),
    Migration(2, "rollouts (one per index) and their audit log", (
        f"""CREATE TABLE rollouts (
    index_name TEXT PRIMARY KEY REFERENCES indexes (name),
    stable TEXT,
    canary TEXT,
    canary_percent INTEGER NOT NULL CHECK (canary_percent BETWEEN 0 AND 100),
    shadow TEXT,
    shadow_percent INTEGER NOT NULL CHECK (shadow_percent BETWEEN 0 AND 100),
    previous_stable TEXT,
    generation BIGINT NOT NULL,
    updated_at TEXT NOT NULL,
{_POINTER_FKS}
)""",
        """CREATE TABLE audit_log (
    id BIGINT PRIMARY KEY,
    index_name TEXT NOT NULL REFERENCES indexes (name),
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    before_json TEXT NOT NULL,
    after_json TEXT NOT NULL
)""",
        "CREATE INDEX audit_log_by_index ON audit_log (index_name, id)",
        # Indexes created before rollouts existed get their (empty) rollout now.
        """INSERT INTO rollouts (index_name, canary_percent, shadow_percent, generation, updated_at)
SELECT name, 0, 0, 0, created_at FROM indexes""",
    )),
    Migration(3, "replicas: who serves which generation", (
        # served_json: {"index": generation, ...} as the replica last reported it.
        """CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    served_json TEXT NOT NULL,
    last_seen TEXT NOT NULL
)""",
    )),
    Migration(4, "evaluation results per version", (
        """CREATE TABLE evaluations (
    id BIGINT PRIMARY KEY,
    index_name TEXT NOT NULL,
    version TEXT NOT NULL,
    query_set TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    FOREIGN KEY (index_name, version) REFERENCES versions (index_name, name)
)""",
        "CREATE INDEX evaluations_by_version ON evaluations (index_name, version, id)",
    )),
)

LATEST = MIGRATIONS[-1].version


def applied_versions(conn: Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def migrate(conn: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply the migrations missing from `conn`; returns their versions. The caller owns the
    transaction, so a failure leaves the database as it was."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                 "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    applied = set(applied_versions(conn))
    known = max((m.version for m in migrations), default=0)
    if applied and max(applied) > known:
        raise IncompatibleSchema(
            f"registry schema version {max(applied)} is newer than this colgrid understands "
            f"(up to {known}); upgrade colgrid, or open a registry written by this version")
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        for statement in migration.statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                     (migration.version, now))
        done.append(migration.version)
    return done
