"""OpenTelemetry traces: a server with COLGRID_OTEL_ENDPOINT exports a SERVER span per call and
child spans for a search's stages over OTLP/gRPC, continuing the caller's trace (W3C
traceparent, which the colgrid client sends for the caller's current span). The collector is a
real gRPC server speaking OTLP, started by the test."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from colgrid_client import Client
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from tests.conftest import start_live_server, stop_live_server

SEARCH = "colgrid.v1.SearchService/Search"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    def __init__(self) -> None:
        self.spans: list = []
        self.service_of: dict[bytes, str] = {}  # span id -> the exporting server's service.name
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the OTLP service's name
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
                    self.service_of.update({s.span_id: attrs.get("service.name", "") for s in scope.spans})
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_service(self, name: str) -> list:
        with self._lock:
            return [s for s in self.spans if self.service_of[s.span_id] == name]

    def trace(self, trace_id: str, at_least: int, timeout: float = 20.0) -> list:
        """The spans of one trace, once at least `at_least` have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    sink = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, port
    server.stop(None)


@pytest.fixture(scope="module")
def traced(served_data_dir: Path, collector):
    _, port = collector
    server, thread = start_live_server(served_data_dir, otel_endpoint=f"http://127.0.0.1:{port}",
                                       otel_service_name="colgrid-test")
    yield server
    stop_live_server(server, thread)


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        out[a.key] = value.string_value if value.HasField("string_value") else (
            value.int_value if value.HasField("int_value") else value.bool_value)
    return out


def by_name(spans: list) -> dict:
    return {s.name: s for s in spans}


def search(target: str, index: str, query: str, trace_id: str | None = None, parent: str = PARENT_ID,
           request_id: str = "") -> pb.SearchResponse:
    """One Search call, sending a sampled W3C traceparent when trace_id is given."""
    metadata = [("traceparent", f"00-{trace_id}-{parent}-01")] if trace_id else []
    metadata += [("x-request-id", request_id)] if request_id else []
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(index=index, query=query, k=3),
                                                         metadata=metadata, timeout=60)


def test_a_search_continues_the_callers_trace_with_a_span_per_stage(traced, collector):
    sink, _ = collector
    response = search(traced.target, "docs", "open a file", TRACE_ID, request_id="trace-test-1")
    spans = by_name(sink.trace(TRACE_ID, at_least=5))
    assert {SEARCH, "encode query", "search", "candidates", "maxsim"} <= set(spans)
    server = spans[SEARCH]
    assert server.parent_span_id.hex() == PARENT_ID and server.kind == server.SPAN_KIND_SERVER
    expected = {"rpc.system": "grpc", "rpc.service": "colgrid.v1.SearchService", "rpc.method": "Search",
                "rpc.grpc.status_code": 0, "colgrid.index": "docs", "colgrid.version": response.version,
                "colgrid.request_id": "trace-test-1"}
    assert {k: attributes(server).get(k) for k in expected} == expected
    search_span = spans["search"]
    for child in ("encode query", "search"):
        assert spans[child].parent_span_id == server.span_id, child
    for stage in ("candidates", "maxsim"):
        assert spans[stage].parent_span_id == search_span.span_id, stage
    assert attributes(search_span)["colgrid.candidates"] == response.stats.candidates > 0
    assert search_span.start_time_unix_nano <= spans["candidates"].start_time_unix_nano
    assert spans["candidates"].end_time_unix_nano == spans["maxsim"].start_time_unix_nano
    assert sink.service_of[server.span_id] == "colgrid-test"


def test_a_failed_call_is_an_error_span_with_its_status_code(traced, collector):
    sink, _ = collector
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with pytest.raises(grpc.RpcError) as info:
        search(traced.target, "no-such-index", "open a file", trace_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    (span,) = sink.trace(trace_id, at_least=1)
    assert span.name == SEARCH and span.status.code == span.status.STATUS_CODE_ERROR
    assert attributes(span)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_the_client_sends_the_callers_current_span(traced, collector):
    from opentelemetry.sdk.trace import TracerProvider

    sink, _ = collector
    tracer = TracerProvider().get_tracer("caller")  # not installed globally: only its context is used
    with tracer.start_as_current_span("caller work") as caller:
        with Client(traced.target, timeout=60, retries=0) as client:
            client.search("docs", "parse json", k=2)
        ids = caller.get_span_context()
    trace_id = f"{ids.trace_id:032x}"
    server = by_name(sink.trace(trace_id, at_least=5))[SEARCH]
    assert server.parent_span_id.hex() == f"{ids.span_id:016x}"


def test_new_traces_are_sampled_at_the_configured_ratio(served_data_dir, collector):
    sink, port = collector
    server, thread = start_live_server(served_data_dir, otel_endpoint=f"http://127.0.0.1:{port}",
                                       otel_service_name="colgrid-unsampled", otel_sample_ratio=0.0)
    sampled = "5b8efff798038103d269b633813fc60c"
    try:
        search(server.target, "docs", "open a file")  # a new trace: never sampled at ratio 0
        search(server.target, "docs", "open a file", sampled)  # the caller's sampled trace: kept
    finally:
        stop_live_server(server, thread)  # flushes the exporter
    assert len(sink.trace(sampled, at_least=5)) >= 5
    assert {s.trace_id.hex() for s in sink.of_service("colgrid-unsampled")} == {sampled}


def test_a_server_without_an_endpoint_traces_nothing(live_server):
    assert live_server.running.tracing is None


def test_a_sample_ratio_outside_zero_to_one_is_refused_naming_the_setting():
    from colgrid_server.errors import InvalidArgument
    from colgrid_server.observability import Tracing

    with pytest.raises(InvalidArgument) as info:
        Tracing("http://127.0.0.1:4317", sample_ratio=1.5)
    assert info.value.field == "otel_sample_ratio"
