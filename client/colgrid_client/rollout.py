"""Values the rollout (admin) methods of `Client` and `AsyncClient` return.

    with Client("localhost:50051") as client:
        status = client.start_canary("docs", "v7", 10, reason="new corpus", wait_for_replicas=30)
        print(status.rollout.canary, status.rollout.generation, status.pending_replicas)
        for entry in client.rollout_history("docs"):
            print(entry.at, entry.actor, entry.action, entry.reason)

`Rollout` itself is exported by `colgrid_client`; the rest of the admin surface lives here so
the top-level namespace stays the data-plane API.
"""
from colgrid_client._types import (
    AuditEntry, LoadError, ReplicaAck, Rollout, RolloutStatus, ServingVersion, ShadowStats,
)

__all__ = [
    "AuditEntry",
    "LoadError",
    "ReplicaAck",
    "Rollout",
    "RolloutStatus",
    "ServingVersion",
    "ShadowStats",
]

for _name in __all__:
    if _name != "Rollout":  # reported by the top-level package, which exports it
        globals()[_name].__module__ = __name__
del _name
