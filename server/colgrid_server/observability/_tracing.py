"""OpenTelemetry traces, exported over OTLP/gRPC when settings.otel_endpoint is set (off by
default: then no span is made and nothing of the SDK is imported).

Each served call is a SERVER span named after its method, continuing the caller's trace from
the W3C `traceparent` metadata entry (the colgrid client sends it when the caller has a current
span). Searches add child spans: `encode query`, and `search` with its `candidates` and `maxsim`
stages, carrying the index, version, role and counts. Worker threads see the call's span: the
WorkerPool copies the call's contextvars, which is where OpenTelemetry keeps its context.

Each server has its own TracerProvider (tests run several servers in one process), never the
process-wide one, so it does not interfere with an application that embeds the server.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from colgrid_server.observability._context import request_id
from colgrid_server.security.rpc_handlers import behavior_of, final_code, with_behavior

log = logging.getLogger(__name__)

# The tracer of the server answering the current call (None: tracing off).
_tracer: contextvars.ContextVar[Any] = contextvars.ContextVar("colgrid_tracer", default=None)


class Tracing:
    """One server's tracer provider, OTLP exporter and interceptor."""

    def __init__(self, endpoint: str, *, service_name: str = "colgrid", instance: str = "",
                 sample_ratio: float = 1.0, schedule_delay_ms: int = 1000) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from colgrid_server.errors import InvalidArgument

        if not 0.0 <= sample_ratio <= 1.0:
            raise InvalidArgument(f"otel_sample_ratio must be within [0, 1], not {sample_ratio}",
                                  field="otel_sample_ratio")
        insecure = not endpoint.startswith("https://")
        resource = Resource.create({"service.name": service_name, **({"service.instance.id": instance} if instance else {})})
        # Calls that arrive with a sampled trace are always traced; others at sample_ratio.
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure, timeout=5)  # a dead collector never stalls stop()
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms))
        self.tracer = self.provider.get_tracer("colgrid_server")
        self.interceptor = TracingInterceptor(self.tracer)
        log.info("tracing: OTLP to %s, service %s, sampling %.3g of new traces", endpoint, service_name, sample_ratio)

    def close(self) -> None:
        """Export what is buffered, then stop."""
        self.provider.shutdown()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around every call, the caller's trace continued; outermost, so refused
    calls (auth, admission, malformed) are traced too."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        return with_behavior(handler, self._traced(method, carrier, behavior_of(handler),
                                                   bool(handler.response_streaming)))

    def _traced(self, method: str, carrier: Mapping[str, str], behavior, response_streaming: bool):
        tracer = self._tracer

        if response_streaming and inspect.isasyncgenfunction(behavior):
            async def stream_out(request: Any, context: grpc.aio.ServicerContext):
                with _server_span(tracer, method, carrier) as span:
                    error = None
                    try:
                        async for response in behavior(request, context):
                            _annotate(span, response)
                            yield response
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        _end_status(span, final_code(context, error))
            return stream_out

        async def unary_out(request: Any, context: grpc.aio.ServicerContext):
            with _server_span(tracer, method, carrier) as span:
                error = None
                try:
                    response = await behavior(request, context)
                    if response is not None:
                        _annotate(span, response)
                    return response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    _end_status(span, final_code(context, error))
        return unary_out


@contextlib.contextmanager
def _server_span(tracer: Any, method: str, carrier: Mapping[str, str]) -> Iterator[Any]:
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    service, _, name = method.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    with tracer.start_as_current_span(method, context=extract(carrier), kind=SpanKind.SERVER,
                                      attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as span:
        token = _tracer.set(tracer)
        try:
            span.set_attribute("colgrid.request_id", request_id.get())
            yield span
        finally:
            _tracer.reset(token)


def _annotate(span: Any, response: Any) -> None:
    """Index, version and role from a response that names them (searches, explanations)."""
    try:
        fields = type(response).DESCRIPTOR.fields_by_name
        for name in ("index", "version", "role"):
            if name in fields and isinstance(value := getattr(response, name), str) and value:
                span.set_attribute(f"colgrid.{name}", value)
    except Exception:  # noqa: BLE001 - tracing must never fail a call
        log.debug("could not annotate a span", exc_info=True)


def _end_status(span: Any, code: grpc.StatusCode) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))


# --- spans inside a call ---------------------------------------------------------------------

@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current call's span, or nothing when tracing is off."""
    tracer = _tracer.get()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def stage_spans(stages: list[tuple[str, float]], started_ns: int, **attributes: Any) -> None:
    """Child spans for consecutive stages timed elsewhere: (name, milliseconds) in order,
    the first beginning at started_ns (time.time_ns())."""
    tracer = _tracer.get()
    if tracer is None:
        return
    at = started_ns
    for name, ms in stages:
        end = at + int(ms * 1e6)
        tracer.start_span(name, start_time=at, attributes=_clean(attributes)).end(end_time=end)
        at = end


def tracing_on() -> bool:
    return _tracer.get() is not None


def now_ns() -> int:
    return time.time_ns()


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {f"colgrid.{k}": v for k, v in attributes.items() if isinstance(v, (str, bool, int, float))}
