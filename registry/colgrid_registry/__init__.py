"""colgrid registry: indexes, versions, rollouts, replicas and evaluations (SQLite embedded;
no gRPC here).

Standard library only: importing this package never loads grpc, torch or numpy.

    with open_registry(data_dir / "registry.db") as registry:
        registry.ensure_index("docs")
        v = registry.allocate_version("docs", encoder_id=..., encoder_kind="colbert", dim=384,
                                      storage_uri=..., build_params={})
        registry.mark_ready("docs", v.version, documents=..., tokens=..., manifest_sha256=...)
        registry.set_stable("docs", v.version, actor="alice", reason="first build")
        registry.start_canary("docs", "v2", 10)   # then set_canary_percent, promote or abort_canary
        registry.rollback("docs")                  # stable <-> previous_stable
"""
from colgrid_registry._records import (
    AuditEntry, EvaluationRecord, IndexRecord, ReplicaRecord, Rollout, VersionRecord, VersionState)
from colgrid_registry._registry import Registry, open_registry
from colgrid_registry._schema import LATEST as SCHEMA_VERSION
from colgrid_registry.errors import (
    AlreadyExists, GenerationConflict, IncompatibleSchema, IndexNotFound, InvalidName,
    InvalidTransition, InvalidValue, RegistryError, VersionNotFound, VersionNotReady)

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
    "ReplicaRecord",
    "Rollout",
    "VersionNotFound",
    "VersionNotReady",
    "VersionRecord",
    "VersionState",
    "open_registry",
]
