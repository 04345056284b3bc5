"""The server's exception tree. Domain code raises these; `service.status` maps each to one gRPC
status code in a single table, and the client SDK maps statuses back to its own exceptions.

    ColgridError
    ├── InvalidArgument (ValueError)        bad request field; `.field` names it
    ├── NotFound (LookupError)              unknown index / version / encoder
    ├── FailedPrecondition                  exists but cannot be used now
    │   └── CorruptVersion                  manifest missing/invalid or checksum mismatch
    ├── ResourceExhausted                   request too large for configured limits
    └── EncoderError                        the encoder could not run on this input
"""
from __future__ import annotations


class ColgridError(Exception):
    """Root of every error colgrid raises on purpose. `code` is a stable machine-readable string."""

    code = "INTERNAL"


class InvalidArgument(ColgridError, ValueError):
    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ColgridError, LookupError):
    code = "NOT_FOUND"

    def __init__(self, message: str, *, resource_type: str = "", resource_name: str = "") -> None:
        super().__init__(message)
        self.resource_type = resource_type
        self.resource_name = resource_name


class FailedPrecondition(ColgridError):
    code = "FAILED_PRECONDITION"


class CorruptVersion(FailedPrecondition):
    """An index version on disk that must not be served: no valid manifest, or a checksum differs."""

    code = "CORRUPT_VERSION"

    def __init__(self, message: str, *, version_path: str = "") -> None:
        super().__init__(message)
        self.version_path = version_path


class ResourceExhausted(ColgridError):
    code = "RESOURCE_EXHAUSTED"


class EncoderError(ColgridError):
    code = "ENCODER_ERROR"
