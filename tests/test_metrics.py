"""Prometheus metrics over HTTP: per-method call counts and latencies with their status codes,
the index/version/role that answered each search, search internals, and queue depth."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from colgrid_client import Client, NotFoundError
from tests.conftest import start_live_server, stop_live_server

SEARCH = "colgrid.v1.SearchService/Search"
STREAM = "colgrid.v1.SearchService/SearchStream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scrape:
    """One scrape of /metrics: sample values by (name, labels)."""

    def __init__(self, port: int) -> None:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        self.samples = [s for family in text_string_to_metric_families(body) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def settled(port: int, name: str, expected: float, timeout: float = 5.0, at_least: bool = False,
            **labels: str) -> float:
    """The value of `name` once it reaches `expected` (or after `timeout`). A call's status reaches
    the caller a moment before the server's interceptor has counted it, so counts are polled."""
    reached = (lambda v: v >= expected) if at_least else (lambda v: v == expected)
    deadline = time.monotonic() + timeout
    value = Scrape(port).value(name, **labels)
    while not reached(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = Scrape(port).value(name, **labels)
    return value


@pytest.fixture(scope="module")
def metered(served_data_dir: Path):
    port = free_port()
    server, thread = start_live_server(served_data_dir, metrics_port=port, metrics_host="127.0.0.1",
                                       worker_threads=2, max_queued_requests=7)
    server.metrics_port = port
    yield server
    stop_live_server(server, thread)


@pytest.fixture(scope="module")
def client(metered):
    with Client(metered.target, retries=0, timeout=60) as c:
        yield c


def test_searches_move_the_call_counter_and_latency_histogram_with_index_and_version(metered, client):
    version = client.search("docs", "open a file", k=1).version
    labels = dict(method=SEARCH, code="OK", index="docs", version=version)
    before = Scrape(metered.metrics_port)
    for query in ("read a file", "parse json", "sort a list"):
        client.search("docs", query, k=3)
    counted = before.value("colgrid_requests_total", **labels) + 3
    assert settled(metered.metrics_port, "colgrid_requests_total", counted, **labels) == counted
    timed = before.value("colgrid_request_duration_seconds_count", **labels) + 3
    assert settled(metered.metrics_port, "colgrid_request_duration_seconds_count", timed, **labels) == timed
    after = Scrape(metered.metrics_port)
    assert (after.value("colgrid_request_duration_seconds_sum", **labels)
            > before.value("colgrid_request_duration_seconds_sum", **labels))


def test_failed_calls_are_counted_by_status_code_without_index_labels(metered, client):
    labels = dict(method=SEARCH, code="NOT_FOUND", index="", version="")
    before = Scrape(metered.metrics_port).value("colgrid_requests_total", **labels)
    with pytest.raises(NotFoundError):
        client.search("no-such-index", "open a file")
    assert settled(metered.metrics_port, "colgrid_requests_total", before + 1, **labels) == before + 1


def test_each_search_answer_counts_toward_its_version_and_role(metered, client):
    version = client.search("docs", "open a file", k=1).version
    labels = dict(index="docs", version=version, role="stable")
    before = Scrape(metered.metrics_port).value("colgrid_searches_total", **labels)
    client.search("docs", "read a file", k=2)
    assert len(list(client.search_stream("docs", ["parse json", "sort a list", "join paths"], k=2))) == 3
    assert Scrape(metered.metrics_port).value("colgrid_searches_total", **labels) - before == 4


def test_a_stream_is_one_call_labelled_with_the_version_it_read(metered, client):
    version = client.search("docs", "open a file", k=1).version
    labels = dict(method=STREAM, code="OK", index="docs", version=version)
    before = Scrape(metered.metrics_port).value("colgrid_requests_total", **labels)
    list(client.search_stream("docs", ["parse json", "sort a list"], k=2))
    assert settled(metered.metrics_port, "colgrid_requests_total", before + 1, **labels) == before + 1


def test_encode_and_maxsim_times_and_candidates_are_recorded_per_search(metered, client):
    result = client.search("docs", "open a file", k=1)
    labels = dict(index="docs", version=result.version)
    before = Scrape(metered.metrics_port)
    result = client.search("docs", "compress data with gzip", k=5)
    after = Scrape(metered.metrics_port)
    for name in ("colgrid_search_encode_seconds", "colgrid_search_maxsim_seconds", "colgrid_search_candidates"):
        assert after.value(f"{name}_count", **labels) - before.value(f"{name}_count", **labels) == 1, name
    added = (after.value("colgrid_search_candidates_sum", **labels)
             - before.value("colgrid_search_candidates_sum", **labels))
    assert added == result.stats.candidates > 0
    encode_added = (after.value("colgrid_search_encode_seconds_sum", **labels)
                    - before.value("colgrid_search_encode_seconds_sum", **labels))
    assert encode_added == pytest.approx(result.stats.encode_ms / 1000, rel=1e-3)


def test_queue_gauges_show_the_admission_limit_and_an_idle_server(metered, client):
    client.search("docs", "open a file", k=1)
    assert settled(metered.metrics_port, "colgrid_in_flight", 0) == 0
    scrape = Scrape(metered.metrics_port)
    assert scrape.value("colgrid_admission_limit") == 2 + 7
    assert scrape.value("colgrid_workers") == 2
    assert scrape.value("colgrid_worker_queue_depth") == 0
    assert scrape.value("colgrid_worker_tasks_completed_total") >= 1


def test_health_checks_are_counted_and_unknown_methods_share_one_series(metered):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(metered.target) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        for name in ("A", "B", "C"):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/made.up.Service{name}/Call")(b"", timeout=10)
    health = dict(method="grpc.health.v1.Health/Check", code="OK")
    assert settled(metered.metrics_port, "colgrid_requests_total", 1, at_least=True, **health) >= 1
    scrape = Scrape(metered.metrics_port)
    assert not any("made.up" in s.labels.get("method", "") for s in scrape.samples)


def test_each_server_exports_only_its_own_calls(served_data_dir, metered, client):
    port = free_port()
    other, thread = start_live_server(served_data_dir, metrics_port=port, metrics_host="127.0.0.1")
    try:
        client.search("docs", "open a file", k=1)  # on the first server only
        assert Scrape(port).value("colgrid_requests_total", method=SEARCH) == 0
        assert Scrape(metered.metrics_port).value("colgrid_requests_total", method=SEARCH) > 0
    finally:
        stop_live_server(other, thread)
    with pytest.raises(urllib.error.URLError):  # the exporter stops with its server
        Scrape(port)


def test_metrics_are_off_unless_a_port_is_set(live_server):
    assert live_server.running.metrics is None
