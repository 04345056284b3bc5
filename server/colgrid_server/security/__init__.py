"""Who may call the server, over what, and how much at once.

- API keys (`_keys`): a JSON file of {name, key_sha256, roles}; keys are stored hashed and
  re-read when the file changes. `colgrid keys create` makes one.
- Roles (`_roles`): search, ingest, admin; each grants whole services, none implies another.
- AuthInterceptor: UNAUTHENTICATED / PERMISSION_DENIED before any service code runs.
- TLS (`_tls`): server credentials from PEM files, mutual TLS with a client CA.
- Backpressure (`_admission`): a bounded number of calls in the server; the rest are refused
  with RESOURCE_EXHAUSTED and RetryInfo (overload protection belongs with the other guards).
"""
from __future__ import annotations

from pathlib import Path

import grpc

from colgrid_server.config import Settings
from colgrid_server.security._admission import EXEMPT_SERVICES, AdmissionInterceptor, Gate
from colgrid_server.security._auth import AuthInterceptor, presented_key
from colgrid_server.security._keys import (KEY_PREFIX, ApiKey, KeyStore, create_key, hash_key, new_key,
                                           parse_keys, read_keys, revoke_key, write_keys)
from colgrid_server.security._roles import OPEN_SERVICES, ROLES, SERVICE_ROLES, is_open, required_role
from colgrid_server.security._tls import bind, is_loopback, server_credentials, startup_warnings

__all__ = [
    "EXEMPT_SERVICES", "KEY_PREFIX", "OPEN_SERVICES", "ROLES", "SERVICE_ROLES",
    "AdmissionInterceptor", "ApiKey", "AuthInterceptor", "Gate", "KeyStore",
    "bind", "create_key", "guard_interceptors", "hash_key", "is_loopback", "is_open", "new_key",
    "parse_keys", "presented_key", "read_keys", "required_role", "revoke_key", "server_credentials",
    "startup_warnings", "write_keys",
]


def guard_interceptors(settings: Settings, gate: Gate) -> list[grpc.aio.ServerInterceptor]:
    """Authentication (when api_keys_file is set), then admission: an unauthenticated caller
    is refused before it can take a place in the queue."""
    guards: list[grpc.aio.ServerInterceptor] = []
    if settings.api_keys_file:
        guards.append(AuthInterceptor(KeyStore(Path(settings.api_keys_file))))
    guards.append(AdmissionInterceptor(gate))
    return guards
