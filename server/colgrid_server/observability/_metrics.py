"""Prometheus metrics for one server: calls by method and status, search internals from each
SearchResponse, and the depth of the work queue. Each server has its own CollectorRegistry
(tests run several servers in one process), exported over HTTP on settings.metrics_port.

Labels come only from what the server produced (method names it serves, the index and version
in its responses), never from raw request fields, so a caller cannot grow the label sets.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from colgrid_server.errors import FailedPrecondition
from colgrid_server.security.rpc_handlers import behavior_of, final_code, with_behavior

log = logging.getLogger(__name__)

SEARCH_RESPONSE = "colgrid.v1.SearchResponse"
OTHER_METHOD = "other"


def _known_methods() -> frozenset[str]:
    """Methods that get their own series; any other name a caller sends is counted as "other"
    (unknown methods are refused by auth, and must not mint a series each)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from colgrid_client._pb import colgrid_pb2

    names = set()
    for file in (colgrid_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            names.update(f"{service.full_name}/{m.name}" for m in service.methods)
    names.update(n.replace("v1alpha", "v1") for n in list(names) if n.startswith("grpc.reflection.v1alpha."))
    return frozenset(names)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CANDIDATE_BUCKETS = (10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000)


class _Pool(Protocol):
    workers: int
    queued: int
    running: int
    completed: int
    dropped: int


class _Gate(Protocol):
    capacity: int
    in_use: int
    waiting: int
    refused: int


class Metrics:
    """The instruments of one server, and its HTTP exporter once `serve` is called."""

    def __init__(self, pool: _Pool | None = None, gate: _Gate | None = None, recall: _Comparisons | None = None) -> None:
        """recall: the server's recall sampler (ServingState.recall), read when scraped."""
        self.registry = CollectorRegistry(auto_describe=True)
        call = ("method", "code", "index", "version")
        self.requests = Counter("colgrid_requests", "Finished calls by method and status code (index and "
                                "version: those the response named, else empty).", call, registry=self.registry)
        self.latency = Histogram("colgrid_request_duration_seconds", "Call duration, first byte in to "
                                 "status out (streams: the whole stream).", call, buckets=SECONDS_BUCKETS,
                                 registry=self.registry)
        self.searches = Counter("colgrid_searches", "Search answers (unary and stream) by the version "
                                "that produced them and its rollout role: the traffic share of each version.",
                                ("index", "version", "role"), registry=self.registry)
        version = ("index", "version")
        self.encode = Histogram("colgrid_search_encode_seconds", "Query encoding time per search.", version,
                                buckets=SECONDS_BUCKETS, registry=self.registry)
        self.maxsim = Histogram("colgrid_search_maxsim_seconds", "Exact MaxSim scoring time per search.",
                                version, buckets=SECONDS_BUCKETS, registry=self.registry)
        self.candidates = Histogram("colgrid_search_candidates", "Documents scored exactly per search.",
                                    version, buckets=CANDIDATE_BUCKETS, registry=self.registry)
        if pool is not None or gate is not None:
            self.registry.register(_QueueCollector(pool, gate))
        if recall is not None:
            self.registry.register(_RecallCollector(recall))
        self.interceptor = MetricsInterceptor(self)
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def observe_response(self, response: Any) -> tuple[str, str] | None:
        """Record what a response tells (searches: version, role, timings) and return the
        (index, version) it names, if any. Never raises: metrics must not fail a call."""
        try:
            descriptor = getattr(type(response), "DESCRIPTOR", None)
            if descriptor is None:
                return None
            if descriptor.full_name == SEARCH_RESPONSE:
                self._observe_search(response)
            return _labels_of(response)
        except Exception:  # noqa: BLE001
            log.exception("could not record metrics for a %s", type(response).__name__)
            return None

    def _observe_search(self, response: Any) -> None:
        index, version = response.index, response.version
        self.searches.labels(index, version, response.role or "stable").inc()
        if response.HasField("stats"):
            stats = response.stats
            self.encode.labels(index, version).observe(stats.encode_ms / 1000.0)
            self.maxsim.labels(index, version).observe(stats.maxsim_ms / 1000.0)
            self.candidates.labels(index, version).observe(stats.candidates)

    def observe_call(self, method: str, code: grpc.StatusCode, seconds: float, index: str, version: str) -> None:
        self.requests.labels(method, code.name, index, version).inc()
        self.latency.labels(method, code.name, index, version).observe(seconds)

    # --- exporter --------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Export /metrics over HTTP on host:port (0: a free port); returns the port bound."""
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise FailedPrecondition(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; is another "
                                     f"process using the port? (metrics_port, COLGRID_METRICS_PORT)") from exc
        bound = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    @property
    def port(self) -> int | None:
        """The exporter's port while it serves."""
        return None if self._http is None else self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def _labels_of(response: Any) -> tuple[str, str] | None:
    """(index, version) when the response message names them."""
    fields = type(response).DESCRIPTOR.fields_by_name
    if "index" in fields and "version" in fields:
        index, version = getattr(response, "index"), getattr(response, "version")
        if isinstance(index, str) and isinstance(version, str):
            return index, version
    return None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every served call and reads its responses. Runs outside the auth and admission
    interceptors, so refused calls are counted too (UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._known = _known_methods()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no series for methods the server does not have
        method = handler_call_details.method.lstrip("/")
        label = method if method in self._known else OTHER_METHOD
        return with_behavior(handler, self._timed(label, behavior_of(handler), bool(handler.response_streaming)))

    def _timed(self, method: str, behavior, response_streaming: bool):
        metrics = self._metrics

        if response_streaming and inspect.isasyncgenfunction(behavior):
            async def stream_out(request: Any, context: grpc.aio.ServicerContext):
                started, labels, error = time.perf_counter(), ("", ""), None
                try:
                    async for response in behavior(request, context):
                        labels = metrics.observe_response(response) or labels
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    metrics.observe_call(method, final_code(context, error), time.perf_counter() - started, *labels)
            return stream_out

        async def unary_out(request: Any, context: grpc.aio.ServicerContext):
            started, labels, error = time.perf_counter(), ("", ""), None
            try:
                response = await behavior(request, context)
                if response is not None:
                    labels = metrics.observe_response(response) or labels
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                metrics.observe_call(method, final_code(context, error), time.perf_counter() - started, *labels)
        return unary_out


class _Comparisons(Protocol):
    def stats(self, index: str | None = None) -> list[Any]: ...


class _RecallCollector(Collector):
    """Sampled recall per served version: answers that went out against the same query run
    exhaustively on the same version (ShadowStats with shadow == primary)."""

    def __init__(self, recall: _Comparisons) -> None:
        self._recall = recall

    def collect(self) -> Iterator[Any]:
        stats = self._recall.stats()
        recall = GaugeMetricFamily("colgrid_sampled_recall", "Mean recall@k of sampled searches against exhaustive "
                                   "exact MaxSim on the same version (k as requested).", labels=["index", "version"])
        samples = CounterMetricFamily("colgrid_recall_samples", "Searches rerun exhaustively to measure recall.",
                                      labels=["index", "version"])
        shed = CounterMetricFamily("colgrid_recall_samples_dropped", "Recall samples shed because the sampler was "
                                   "busy.", labels=["index", "version"])
        for s in stats:
            labels = [s.index, s.primary]
            if s.compared:
                recall.add_metric(labels, s.mean_overlap)
            samples.add_metric(labels, s.compared)
            shed.add_metric(labels, s.dropped)
        yield recall
        yield samples
        yield shed


class _QueueCollector(Collector):
    """Queue depth and admission state, read when scraped."""

    def __init__(self, pool: _Pool | None, gate: _Gate | None) -> None:
        self._pool = pool
        self._gate = gate

    def collect(self) -> Iterator[Any]:
        if self._gate is not None:
            gate = self._gate
            yield GaugeMetricFamily("colgrid_in_flight", "Units of work admitted: unary calls and stream "
                                    "messages being served or waiting for a worker.", value=gate.in_use)
            yield GaugeMetricFamily("colgrid_admission_limit", "Units admitted at most (worker_threads + "
                                    "max_queued_requests); calls beyond it are RESOURCE_EXHAUSTED.",
                                    value=gate.capacity)
            yield GaugeMetricFamily("colgrid_stream_messages_waiting", "Stream messages waiting for room.",
                                    value=gate.waiting)
            yield CounterMetricFamily("colgrid_overload_refusals", "Calls refused because the server was full.",
                                      value=gate.refused)
        if self._pool is not None:
            pool = self._pool
            yield GaugeMetricFamily("colgrid_worker_queue_depth", "Tasks waiting for a worker thread.",
                                    value=pool.queued)
            yield GaugeMetricFamily("colgrid_workers_busy", "Worker threads running a task.", value=pool.running)
            yield GaugeMetricFamily("colgrid_workers", "Worker threads.", value=pool.workers)
            yield CounterMetricFamily("colgrid_worker_tasks_dropped", "Queued tasks dropped before they ran "
                                      "(deadline passed or caller gone).", value=pool.dropped)
            yield CounterMetricFamily("colgrid_worker_tasks_completed", "Tasks the workers ran.",
                                      value=pool.completed)
