"""One table from domain errors to gRPC status codes, with google.rpc.Status rich details.

Domain code raises colgrid_server.errors / colgrid_registry.errors; only this module decides
what a client sees. Unknown exceptions become INTERNAL with a generic message (the traceback is
logged, never sent).
"""
from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import colgrid_registry as reg
from colgrid_server import errors as err

log = logging.getLogger(__name__)
ERROR_DOMAIN = "colgrid"

# Most specific first: the first isinstance match wins.
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (err.CorruptVersion, grpc.StatusCode.FAILED_PRECONDITION),
    (err.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (err.NotFound, grpc.StatusCode.NOT_FOUND),
    (err.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (err.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (err.EncoderError, grpc.StatusCode.INVALID_ARGUMENT),
    (reg.InvalidValue, grpc.StatusCode.INVALID_ARGUMENT),  # includes InvalidName
    (reg.IncompatibleSchema, grpc.StatusCode.FAILED_PRECONDITION),
    (reg.IndexNotFound, grpc.StatusCode.NOT_FOUND),
    (reg.VersionNotFound, grpc.StatusCode.NOT_FOUND),
    (reg.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (reg.GenerationConflict, grpc.StatusCode.ABORTED),
    (reg.VersionNotReady, grpc.StatusCode.FAILED_PRECONDITION),
    (reg.InvalidTransition, grpc.StatusCode.FAILED_PRECONDITION),
    (reg.RegistryUnavailable, grpc.StatusCode.UNAVAILABLE),  # clients retry UNAVAILABLE
)


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "code", "") or type(exc).__name__).upper()


def to_rpc_status(exc: BaseException) -> grpc.Status:
    """The grpc.Status (code, message, trailing google.rpc.Status details) for an exception."""
    code = status_code_for(exc)
    message = str(exc) if code != grpc.StatusCode.INTERNAL else "internal error; see server log"
    details: list[any_pb2.Any] = []

    info = error_details_pb2.ErrorInfo(reason=_reason(exc) if code != grpc.StatusCode.INTERNAL else "INTERNAL",
                                       domain=ERROR_DOMAIN)
    check = getattr(exc, "check", None)
    if code != grpc.StatusCode.INTERNAL and isinstance(check, str):
        info.metadata["check"] = check  # which version check refused a rollout (serving.CHECKS)
    rule = getattr(exc, "rule", None)
    if code != grpc.StatusCode.INTERNAL and isinstance(rule, str):
        info.metadata["rule"] = rule  # which promote policy rule refused a promote
    details.append(_pack(info))
    field = getattr(exc, "field", None)
    if code == grpc.StatusCode.INVALID_ARGUMENT and field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    resource_name = getattr(exc, "resource_name", "")
    if code == grpc.StatusCode.NOT_FOUND and resource_name:
        details.append(_pack(error_details_pb2.ResourceInfo(
            resource_type=getattr(exc, "resource_type", ""), resource_name=resource_name,
            description=message)))
    version_path = getattr(exc, "version_path", "")
    if version_path:
        details.append(_pack(error_details_pb2.ResourceInfo(
            resource_type="index-version", resource_name=version_path, description=message)))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(status)


def _pack(msg) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with the status for `exc`. Raises (as context.abort does)."""
    status = to_rpc_status(exc)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    await context.abort_with_status(status)
