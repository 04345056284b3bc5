"""Which role may call which service. Roles do not imply one another: `admin` alone cannot
search or ingest; give a key every role it needs (`--role search --role admin`).

    search   colgrid.v1.SearchService/*  colgrid.v1.EncodeService/*
    ingest   colgrid.v1.IngestService/*
    admin    colgrid.v1.RegistryService/*  colgrid.v1.RolloutService/*  colgrid.v1.EvaluationService/*
    (none)   grpc.health.v1.Health/*, server reflection: open to every caller, key or not

A colgrid.v1 service missing from this table is refused to every key (fail closed): a new
service must be given a role here before anyone can call it.
"""
from __future__ import annotations

ROLES = ("search", "ingest", "admin")

SERVICE_ROLES: dict[str, str] = {
    "colgrid.v1.SearchService": "search",
    "colgrid.v1.EncodeService": "search",
    "colgrid.v1.IngestService": "ingest",
    "colgrid.v1.RegistryService": "admin",
    "colgrid.v1.RolloutService": "admin",
    "colgrid.v1.EvaluationService": "admin",
}

# Probes and tooling must work without a key: health for load balancers and Kubernetes,
# reflection for grpcurl (it reveals the schema only, which is public in the proto anyway).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


def service_of(method: str) -> str:
    """'/colgrid.v1.SearchService/Search' -> 'colgrid.v1.SearchService'."""
    return method.lstrip("/").partition("/")[0]


def is_open(method: str) -> bool:
    return service_of(method) in OPEN_SERVICES


def required_role(method: str) -> str | None:
    """The role a caller needs for `method`; None when no role grants it."""
    return SERVICE_ROLES.get(service_of(method))
