"""The registry's exception tree. Every error it raises on purpose is a `RegistryError`; the
server maps each class to one gRPC status in `colgrid_server.service.status`.

    RegistryError
    ├── IndexNotFound (LookupError)          no index of that name
    ├── VersionNotFound (LookupError)        the index exists, the version does not
    ├── AlreadyExists                        create_index / create_version on a taken name
    ├── InvalidValue (ValueError)            bad argument; `.field` names it
    │   └── InvalidName                      index/version name outside ^[a-z0-9][a-z0-9._-]{0,62}$
    ├── VersionNotReady                      a rollout pointer may only go to a READY version
    ├── InvalidTransition                    state change not allowed (READY -> BUILDING, retire
    │                                        stable, promote without a canary, ...)
    ├── GenerationConflict                   compare-and-set lost: `.expected` != `.actual`
    └── IncompatibleSchema                   database written by a newer colgrid

`code` is a stable machine-readable string (the same convention as `colgrid_server.errors`);
`resource_type` / `resource_name` on the lookups feed google.rpc.ResourceInfo.
"""
from __future__ import annotations


class RegistryError(Exception):
    code = "REGISTRY_ERROR"


class RegistryUnavailable(RegistryError):
    """The registry database cannot be reached right now (connection lost, write lock held
    too long, connections exhausted): retrying later may succeed."""

    code = "REGISTRY_UNAVAILABLE"


class IndexNotFound(RegistryError, LookupError):
    code = "INDEX_NOT_FOUND"
    resource_type = "index"

    def __init__(self, index: str) -> None:
        super().__init__(f"index {index!r} does not exist; create it first (create_index)")
        self.index = index
        self.resource_name = index


class VersionNotFound(RegistryError, LookupError):
    code = "VERSION_NOT_FOUND"
    resource_type = "index-version"

    def __init__(self, index: str, version: str) -> None:
        super().__init__(f"index {index!r} has no version {version!r}; list_versions shows the known ones")
        self.index = index
        self.version = version
        self.resource_name = f"{index}/{version}"


class AlreadyExists(RegistryError):
    code = "ALREADY_EXISTS"

    def __init__(self, message: str, *, resource_type: str, resource_name: str) -> None:
        super().__init__(message)
        self.resource_type = resource_type
        self.resource_name = resource_name


class InvalidValue(RegistryError, ValueError):
    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidName(InvalidValue):
    code = "INVALID_NAME"


class VersionNotReady(RegistryError):
    code = "VERSION_NOT_READY"

    def __init__(self, index: str, version: str, state: str, *,
                 why: str = "a rollout pointer may only go to a READY version") -> None:
        # `why` says what needed the version READY and, where there is one, what to do instead.
        super().__init__(f"version {version!r} of index {index!r} is {state}; {why}")
        self.index = index
        self.version = version
        self.state = state


class InvalidTransition(RegistryError):
    code = "INVALID_TRANSITION"

    def __init__(self, message: str, *, index: str, version: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.version = version  # None when the refused change names no version (promote, ...)


class GenerationConflict(RegistryError):
    code = "GENERATION_CONFLICT"

    def __init__(self, index: str, *, expected: int, actual: int) -> None:
        super().__init__(f"rollout of index {index!r} changed concurrently: expected generation "
                         f"{expected}, found {actual}; re-read the rollout and retry")
        self.index = index
        self.expected = expected
        self.actual = actual


class IncompatibleSchema(RegistryError):
    code = "INCOMPATIBLE_SCHEMA"
