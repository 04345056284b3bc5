"""colgrid registry: indexes, versions and rollouts (SQLite embedded; no gRPC here)."""
