"""colgrid registry: indexes, versions, rollouts, replicas and evaluations (SQLite embedded, or
PostgreSQL by URL for several replicas; no gRPC here).

Standard library only: importing this package never loads grpc, torch or numpy (psycopg is
imported when a PostgreSQL registry is opened).

    with open_registry(data_dir / "registry.db") as registry:
        registry.ensure_index("docs")
        v = registry.allocate_version("docs", encoder_id=..., encoder_kind="colbert", dim=384,
                                      storage_uri=..., build_params={})
        registry.mark_ready("docs", v.version, documents=..., tokens=..., manifest_sha256=...)
        registry.set_stable("docs", v.version, actor="alice", reason="first build")
        registry.start_canary("docs", "v2", 10)   # then set_canary_percent, promote or abort_canary
        registry.rollback("docs")                  # stable <-> previous_stable
"""
from pathlib import Path as _Path

from colgrid_registry._records import (
    AuditEntry, EvaluationRecord, IndexRecord, ReplicaRecord, Rollout, VersionRecord, VersionState)
from colgrid_registry._registry import Registry
from colgrid_registry._registry import open_registry as _open_sqlite
from colgrid_registry._schema import LATEST as SCHEMA_VERSION
from colgrid_registry.errors import (
    AlreadyExists, GenerationConflict, IncompatibleSchema, IndexNotFound, InvalidName,
    InvalidTransition, InvalidValue, RegistryError, RegistryUnavailable, VersionNotFound, VersionNotReady)

__all__ = [
    "SCHEMA_VERSION",
    "AlreadyExists",
    "AuditEntry",
    "EvaluationRecord",
    "GenerationConflict",
    "IncompatibleSchema",
    "IndexNotFound",
    "IndexRecord",
    "InvalidName",
    "InvalidTransition",
    "InvalidValue",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "ReplicaRecord",
    "Rollout",
    "VersionNotFound",
    "VersionNotReady",
    "VersionRecord",
    "VersionState",
    "open_registry",
]


def open_registry(url_or_path: str | _Path, *, busy_timeout_s: float = 10.0) -> Registry:
    """Open (creating and migrating if needed) the registry at a path, `sqlite:///abs/path.db`,
    or `postgresql://user:password@host:port/database` (also `postgres://`; libpq parameters
    such as `?sslmode=require` or `?options=-csearch_path%3Dcolgrid` may follow).
    `busy_timeout_s` bounds how long a write waits for another writer."""
    if isinstance(url_or_path, str) and url_or_path.lower().startswith(("postgresql://", "postgres://")):
        from colgrid_registry._postgres import PostgresDatabase  # imports psycopg, only now

        return Registry(PostgresDatabase(str(url_or_path), busy_timeout_s=busy_timeout_s))
    return _open_sqlite(url_or_path, busy_timeout_s=busy_timeout_s)
