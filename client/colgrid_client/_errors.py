"""Every error the SDK raises, one class per gRPC status the server uses on purpose.

    ColgridError                                  root; .code .details .request_id + rich details
    ├── InvalidArgumentError (ValueError)         INVALID_ARGUMENT, OUT_OF_RANGE; .field_violations
    ├── NotFoundError (LookupError)               NOT_FOUND; .resource_info names what is missing
    ├── FailedPreconditionError                   FAILED_PRECONDITION (e.g. version not READY)
    ├── ResourceExhaustedError                    RESOURCE_EXHAUSTED (over limits; retried when the server gives a delay)
    ├── UnavailableError                          UNAVAILABLE (retried by the client, then raised)
    ├── DeadlineExceededError (TimeoutError)      DEADLINE_EXCEEDED (the call's timeout passed)
    ├── AbortedError                              ABORTED (e.g. rollout generation conflict)
    ├── PermissionDeniedError                     PERMISSION_DENIED
    ├── UnauthenticatedError                      UNAUTHENTICATED
    └── InternalError                             INTERNAL, UNKNOWN, DATA_LOSS, malformed answers

Other codes (CANCELLED, UNIMPLEMENTED, ALREADY_EXISTS) raise the root `ColgridError`.
`from_rpc_error` is the only place a grpc error becomes one of these.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The metadata key carrying the request id both ways (sent by the client, echoed by the server).
REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass(frozen=True)
class ResourceInfo:
    """The resource an error is about (google.rpc.ResourceInfo), e.g. ("index", "docs")."""

    resource_type: str
    resource_name: str
    owner: str = ""
    description: str = ""


class ColgridError(Exception):
    """Root of every SDK error.

    `code` is the grpc.StatusCode, `details` the server's message, `request_id` the id this call
    carried (quote it when reporting a problem). When the server attached a google.rpc.Status,
    its details are parsed: `field_violations`, `resources`, `reason`/`domain`/`error_metadata`
    (google.rpc.ErrorInfo, `reason` being a stable machine-readable string such as
    "CORRUPT_VERSION") and `retry_delay` in seconds (google.rpc.RetryInfo).
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None, request_id: str = "",
                 field_violations: tuple[FieldViolation, ...] = (),
                 resources: tuple[ResourceInfo, ...] = (), reason: str = "", domain: str = "",
                 error_metadata: Mapping[str, str] | None = None,
                 retry_delay: float | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.code = code if code is not None else self.default_code
        self.request_id = request_id
        self.field_violations = field_violations
        self.resources = resources
        self.reason = reason
        self.domain = domain
        self.error_metadata = dict(error_metadata or {})
        self.retry_delay = retry_delay

    @property
    def resource_info(self) -> ResourceInfo | None:
        """The first resource the error names, if any."""
        return self.resources[0] if self.resources else None

    def __str__(self) -> str:
        suffix = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{self.code.name}: {self.details}{suffix}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes survive pickling (multiprocessing, logging handlers).
        return (type(self), (self.details,), self.__dict__)


class InvalidArgumentError(ColgridError, ValueError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ColgridError, LookupError):
    default_code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(ColgridError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ColgridError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ColgridError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ColgridError, TimeoutError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class AbortedError(ColgridError):
    default_code = grpc.StatusCode.ABORTED


class PermissionDeniedError(ColgridError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ColgridError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class InternalError(ColgridError):
    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ColgridError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_class_for(code: grpc.StatusCode) -> type[ColgridError]:
    return _BY_CODE.get(code, ColgridError)


def from_rpc_error(error: grpc.RpcError, *, request_id: str = "") -> ColgridError:
    """Translate a failed call (sync grpc.RpcError or grpc.aio.AioRpcError) to our tree.

    `request_id` is the id the call was sent with; an id echoed in the trailers wins.
    """
    code = _call_attr(error, "code") or grpc.StatusCode.UNKNOWN
    details = _call_attr(error, "details") or code.name.lower().replace("_", " ")
    trailers = tuple(_call_attr(error, "trailing_metadata") or ())
    for key, value in trailers:
        if key == REQUEST_ID_KEY and value:
            request_id = value if isinstance(value, str) else value.decode("utf-8", "replace")
    return error_class_for(code)(details, code=code, request_id=request_id,
                                 **_rich_details(error))


def _call_attr(error: grpc.RpcError, name: str) -> Any:
    # A bare grpc.RpcError need not be a grpc.Call; the concrete sync and aio errors are.
    method = getattr(error, name, None)
    return method() if callable(method) else None


def _rich_details(error: grpc.RpcError) -> dict[str, Any]:
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        return {}  # a status that contradicts the call's code/message is not trusted
    if status is None:
        return {}
    violations: list[FieldViolation] = []
    resources: list[ResourceInfo] = []
    found: dict[str, Any] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            res = error_details_pb2.ResourceInfo()
            detail.Unpack(res)
            resources.append(ResourceInfo(res.resource_type, res.resource_name, res.owner,
                                          res.description))
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.update(reason=info.reason, domain=info.domain,
                         error_metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_delay"] = retry.retry_delay.ToTimedelta().total_seconds()
    return {**found, "field_violations": tuple(violations), "resources": tuple(resources)}
