"""What Client and AsyncClient share: the calls they make, retry policy, deadlines, streams.

Each public method on either client is one line: build a `Call` here, hand it to that client's
own unary loop (blocking or awaiting). Only the loop and the sleep differ between the two.
"""
from __future__ import annotations

import collections
import itertools
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from colgrid_client import _convert as convert
from colgrid_client._errors import REQUEST_ID_KEY, ColgridError, InternalError
from colgrid_client._errors import from_rpc_error
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_client._types import AuditEntry, IndexInfo, Matrix, RolloutStatus, SearchResult, Version
from colgrid_client._types import IngestError, IngestOptions, IngestProgress, IngestResult

T = TypeVar("T")
DEFAULT_TARGET = "localhost:50051"
# Document batches come back as float32 multi-vectors: allow more than grpc's 4 MiB default.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)
MAX_BACKOFF_S = 5.0


def new_request_id() -> str:
    return uuid.uuid4().hex


def channel_options(options: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """Our defaults, overridden key by key by the caller's options."""
    merged = dict(DEFAULT_OPTIONS)
    merged.update(options or ())
    return list(merged.items())


# --- Channels: TLS and API keys ----------------------------------------------------------------

# PEM bytes, PEM text, or the path of a PEM file.
PemSource = bytes | str | os.PathLike
AUTHORIZATION_KEY = "authorization"


def read_pem(source: PemSource | None, what: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode("ascii")
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} from {source}: {exc.strerror or exc}") from exc


def channel_credentials(credentials: grpc.ChannelCredentials | None, root_certificates: PemSource | None,
                        private_key: PemSource | None,
                        certificate_chain: PemSource | None) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel (None: plaintext). `root_certificates` verifies the server
    (None with a client certificate: the system's roots); `private_key` + `certificate_chain`
    are this client's certificate for mutual TLS."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (the client certificate for mutual TLS)")
    if credentials is not None:
        if root_certificates is not None or private_key is not None:
            raise ValueError("give either credentials or root_certificates/private_key/certificate_chain, not both")
        return credentials
    if root_certificates is None and private_key is None:
        return None
    return grpc.ssl_channel_credentials(read_pem(root_certificates, "root_certificates"),
                                        read_pem(private_key, "private_key"),
                                        read_pem(certificate_chain, "certificate_chain"))


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    if api_key is None:
        return ()
    key = api_key.strip()
    if not key or any(c in key for c in "\r\n"):
        raise ValueError("api_key is empty or spans lines; pass the key exactly as `colgrid keys create` printed it")
    return ((AUTHORIZATION_KEY, f"Bearer {key}"),)


_UNSET: Any = object()
_inject: Any = _UNSET


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's current trace as W3C `traceparent` (and `tracestate`, baggage) metadata, so a
    server with tracing on continues it; () without opentelemetry-api or a current span."""
    global _inject
    if _inject is _UNSET:  # resolved once: a failed import is slow to repeat on every call
        try:
            from opentelemetry.propagate import inject
        except ImportError:
            inject = None
        _inject = inject
    if _inject is None:
        return ()
    carrier: dict[str, str] = {}
    _inject(carrier)
    return tuple(carrier.items())


def _tracing_available() -> bool:
    trace_metadata()
    return _inject is not None


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                             "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the API key and the caller's trace context to every call on a blocking channel,
    streams included."""

    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout,
                            (*(details.metadata or ()), *self._extra, *trace_metadata()),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def sync_channel(target: str, credentials: grpc.ChannelCredentials | None,
                 options: list[tuple[str, Any]], api_key: str | None) -> grpc.Channel:
    channel = (grpc.secure_channel(target, credentials, options=options) if credentials
               else grpc.insecure_channel(target, options=options))
    extra = auth_metadata(api_key)
    return grpc.intercept_channel(channel, _SyncMetadata(extra)) if extra or _tracing_available() else channel


class _AioMetadata:
    """Adds the API key and the caller's trace context to every call on a grpc.aio channel,
    which takes one interceptor per call shape (the four subclasses below)."""

    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *self._extra, *trace_metadata())
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _AioUnaryUnaryMetadata(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStreamMetadata(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnaryMetadata(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStreamMetadata(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def aio_channel(target: str, credentials: grpc.ChannelCredentials | None,
                options: list[tuple[str, Any]], api_key: str | None) -> grpc.aio.Channel:
    extra = auth_metadata(api_key)
    interceptors = ([kind(extra) for kind in (_AioUnaryUnaryMetadata, _AioUnaryStreamMetadata,
                                              _AioStreamUnaryMetadata, _AioStreamStreamMetadata)]
                    if extra or _tracing_available() else None)
    if credentials:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


@dataclass(frozen=True)
class Stubs:
    search: pb_grpc.SearchServiceStub
    encode: pb_grpc.EncodeServiceStub
    registry: pb_grpc.RegistryServiceStub
    rollout: pb_grpc.RolloutServiceStub
    ingest: pb_grpc.IngestServiceStub
    evaluation: pb_grpc.EvaluationServiceStub

    @classmethod
    def on(cls, channel: grpc.Channel | grpc.aio.Channel) -> Stubs:
        return cls(pb_grpc.SearchServiceStub(channel), pb_grpc.EncodeServiceStub(channel),
                   pb_grpc.RegistryServiceStub(channel), pb_grpc.RolloutServiceStub(channel),
                   pb_grpc.IngestServiceStub(channel), pb_grpc.EvaluationServiceStub(channel))


@dataclass(frozen=True)
class Deadline:
    """An absolute deadline for a whole call, retries and backoff included (None: no limit)."""

    at: float | None

    @classmethod
    def after(cls, timeout: float | None) -> Deadline:
        return cls(None if timeout is None else time.monotonic() + timeout)

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


@dataclass(frozen=True)
class RetryPolicy:
    """Retry UNAVAILABLE (the request never reached a serving replica, so retrying is safe) and
    RESOURCE_EXHAUSTED that carries a retry delay (an overloaded server refused the call before
    doing any of its work, and said when to come back); nothing else.

    Delays grow as backoff * 2**attempt, capped, with "equal jitter" (half fixed, half random)
    so that clients knocked over together do not come back together.
    """

    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = MAX_BACKOFF_S

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got {self.retries}, {self.backoff}")

    def delay(self, error: ColgridError, attempt: int, deadline: Deadline) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to raise `error` now."""
        overloaded = error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None
        if not (error.code == grpc.StatusCode.UNAVAILABLE or overloaded) or attempt >= self.retries:
            return None
        ceiling = min(self.max_backoff, self.backoff * 2**attempt)
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        if error.retry_delay is not None:
            wait = max(wait, error.retry_delay)  # the server asked for at least this long
        remaining = deadline.remaining()
        if remaining is not None and remaining <= wait:
            return None  # no time left for another attempt: this error is the answer
        return wait


@dataclass(frozen=True)
class Call(Generic[T]):
    """One unary RPC, ready to send: which stub method, the request, how to read the answer."""

    service: str
    method: str
    request: Any
    convert: Callable[[Any], T]
    request_id: str = field(default_factory=new_request_id)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.request_id),)

    def bind(self, stubs: Stubs) -> Callable[..., Any]:
        return getattr(getattr(stubs, self.service), self.method)


# --- The calls, one builder per public method --------------------------------------------------

def search(index: str, query: str, k: int, explain: bool, nprobe: int, n_candidates: int,
           routing_key: str, query_vectors: Any, exhaustive: bool,
           filter: Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
           doc_ids: Sequence[str] | None = None) -> Call[SearchResult]:
    request_id = new_request_id()
    request = convert.search_request(index, query, k=k, explain=explain, nprobe=nprobe,
                                     n_candidates=n_candidates, routing_key=routing_key,
                                     query_vectors=query_vectors, exhaustive=exhaustive,
                                     request_id=request_id, filter=filter, doc_ids=doc_ids)
    return Call("search", "Search", request,
                lambda r: convert.from_search_response(r, request_id), request_id)


def encode_query(index: str | None, text: str, encoder_id: str | None) -> Call[Matrix]:
    return Call("encode", "EncodeQuery", convert.encode_query_request(index, text, encoder_id),
                _only_vector)


def _only_vector(response: Any) -> Matrix:
    vectors = convert.from_encode_response(response)
    if len(vectors) != 1:
        raise InternalError(f"server answered one query with {len(vectors)} multi-vectors")
    return vectors[0]


def encode_documents(index: str | None, texts: Iterable[str], encoder_id: str | None
                     ) -> Call[list[Matrix]]:
    texts = texts if isinstance(texts, str) else list(texts)
    request = convert.encode_documents_request(index, texts, encoder_id)
    expected = len(texts)

    def read(response: Any) -> list[Matrix]:
        vectors = convert.from_encode_response(response)
        if len(vectors) != expected:
            raise InternalError(f"server answered {expected} texts with {len(vectors)} "
                                f"multi-vectors")
        return vectors

    return Call("encode", "EncodeDocuments", request, read)


def list_indexes() -> Call[list[IndexInfo]]:
    return Call("registry", "ListIndexes", convert.list_indexes_request(),
                convert.from_list_indexes_response)


def get_index(name: str) -> Call[IndexInfo]:
    return Call("registry", "GetIndex", convert.get_index_request(name), convert.from_index_info)


def list_versions(index: str) -> Call[list[Version]]:
    return Call("registry", "ListVersions", convert.list_versions_request(index),
                convert.from_list_versions_response)


def get_version(index: str, version: str) -> Call[Version]:
    return Call("registry", "GetVersion", convert.get_version_request(index, version),
                convert.from_version)


# --- Rollouts: every change answers with the RolloutStatus after it -----------------------------

# Time allowed on top of `wait_for_replicas` for the change itself (loading the version it
# routes to) when the caller gave no timeout of their own.
CHANGE_MARGIN_S = 30.0


def change_timeout(timeout: float | None, default: float | None,
                   wait_for_replicas: float | None) -> float | None:
    """The deadline of a rollout change: the caller's, else the client default stretched to
    cover the replica wait (a wait longer than the deadline would always end in an error)."""
    if timeout is not None or default is None or not wait_for_replicas:
        return timeout
    return max(default, wait_for_replicas + CHANGE_MARGIN_S)


def get_rollout(index: str) -> Call[RolloutStatus]:
    return Call("rollout", "GetRollout", convert.get_rollout_request(index), convert.from_rollout_status)


def rollout_change(method: str, request: Any) -> Call[RolloutStatus]:
    """`method` is the RolloutService RPC (StartCanary, Promote, ...) `request` is for."""
    return Call("rollout", method, request, convert.from_rollout_status)


def rollout_history(index: str, limit: int) -> Call[list[AuditEntry]]:
    return Call("rollout", "RolloutHistory", convert.rollout_history_request(index, limit),
                convert.from_rollout_history_response)


# --- Streams -----------------------------------------------------------------------------------

class SearchStream:
    """Bookkeeping for one SearchStream call: request ids, answer order, deferred input errors.

    Requests are built lazily as the caller's iterable is consumed (it may be endless). An input
    that cannot become a request ends the request side cleanly; the answers already owed are
    delivered first, then `finish()` raises the input's error. Answers must echo request ids in
    request order (the server's contract); anything else is an InternalError.
    """

    def __init__(self, index: str, defaults: Mapping[str, Any]) -> None:
        convert.search_request(index, **defaults)  # fail fast on bad knobs, before any I/O
        self.index = index
        self.defaults = dict(defaults)
        self.stream_id = new_request_id()
        self._numbers = itertools.count()
        self._pending: deque[str] = deque()  # sent, not yet answered (appended by grpc's thread)
        self._input_error: BaseException | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.stream_id),)

    @property
    def in_flight_id(self) -> str:
        """The request an error now belongs to: the oldest unanswered one."""
        pending = tuple(self._pending)
        return pending[0] if pending else self.stream_id

    def _build(self, query: Any) -> Any:
        number = next(self._numbers)
        given = query.get("request_id") if isinstance(query, Mapping) else None
        request_id = given or f"{self.stream_id}-{number}"
        request = convert.stream_search_request(self.index, query, self.defaults, request_id)
        self._pending.append(request_id)
        return request

    def requests(self, queries: Iterable[Any]) -> Iterator[Any]:
        try:
            for query in queries:
                yield self._build(query)
        except Exception as exc:  # noqa: BLE001 - re-raised to the caller by finish()
            self._input_error = exc

    async def arequests(self, queries: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        try:
            if isinstance(queries, AsyncIterable):
                async for query in queries:
                    yield self._build(query)
            else:
                for query in queries:
                    yield self._build(query)
        except Exception as exc:  # noqa: BLE001 - re-raised to the caller by finish()
            self._input_error = exc

    def accept(self, response: Any) -> SearchResult:
        if not self._pending:
            raise InternalError("server sent more stream answers than queries",
                                request_id=self.stream_id)
        expected = self._pending.popleft()
        result = convert.from_search_response(response, expected)
        if result.request_id != expected:
            raise InternalError(f"stream answer for request {result.request_id!r} arrived where "
                                f"{expected!r} was next", request_id=expected)
        return result

    def finish(self) -> None:
        if self._input_error is not None:
            raise self._input_error
        if self._pending:
            raise InternalError(f"stream ended with {len(self._pending)} queries unanswered",
                                request_id=self.in_flight_id)


class IngestStream:
    """Bookkeeping for one Ingest call: its requests (the options, then one per document, built
    lazily as the caller's iterable is consumed, so it may be a generator over a large corpus),
    the progress messages in order, and the result.

    A document that cannot become a request must not end the request side cleanly: the server
    would build a version from the documents before it. The call is cancelled instead (nothing
    is published) and `finish()` / `error()` give the input's own error.
    """

    def __init__(self, options: IngestOptions, on_progress: Callable[[IngestProgress], Any] | None) -> None:
        self._options = convert.ingest_request(options)  # fail fast on bad options, before any I/O
        self.request_id = new_request_id()
        self._on_progress = on_progress
        self._input_error: BaseException | None = None
        self._cancel: Callable[[], Any] | None = None
        self._bound = threading.Event()
        self._errors: list[IngestError] = []
        self._last: IngestProgress | None = None
        self._messages = 0

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.request_id),)

    def bind(self, cancel: Callable[[], Any]) -> None:
        """The call's cancel, once the call exists (the request thread may wait for it)."""
        self._cancel = cancel
        self._bound.set()

    def _abandon(self, exc: BaseException) -> None:
        self._input_error = exc
        self._bound.wait(60)
        if self._cancel is not None:
            self._cancel()

    def requests(self, documents: Iterable[Any]) -> Iterator[Any]:
        yield self._options
        try:
            for doc in documents:
                yield _document_request(doc)
        except Exception as exc:  # noqa: BLE001 - re-raised to the caller by finish()
            self._abandon(exc)

    async def arequests(self, documents: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
        yield self._options
        try:
            if isinstance(documents, AsyncIterable):
                async for doc in documents:
                    yield _document_request(doc)
            else:
                for doc in documents:
                    yield _document_request(doc)
        except Exception as exc:  # noqa: BLE001 - re-raised to the caller by finish()
            self._input_error = exc
            if self._cancel is not None:  # bound synchronously right after the call was made
                self._cancel()

    def accept(self, message: Any) -> IngestProgress:
        progress = convert.from_ingest_progress(message)
        self._messages += 1
        self._errors.extend(progress.errors)
        self._last = progress
        if self._on_progress is not None:
            self._on_progress(progress)
        return progress

    def error(self, exc: grpc.RpcError) -> BaseException:
        """What the caller sees for a failed call: the input's error if a document caused it."""
        if self._input_error is not None:
            return self._input_error
        return from_rpc_error(exc, request_id=self.request_id)

    def finish(self) -> IngestResult:
        if self._input_error is not None:
            raise self._input_error
        last = self._last
        if last is None or last.stage != "ready" or last.version is None:
            raise InternalError("the ingest stream ended without a READY version", request_id=self.request_id)
        return IngestResult(version=last.version, errors=tuple(self._errors), received=last.received,
                            encoded=last.encoded, failed=last.failed, elapsed_s=last.elapsed_s,
                            progress_messages=self._messages)


def _document_request(doc: Any) -> Any:
    if isinstance(doc, IngestOptions):
        raise convert.invalid("documents", "options go in the ingest() keywords, not among the documents")
    return convert.ingest_request(doc)
