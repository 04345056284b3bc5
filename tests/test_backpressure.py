"""Backpressure and deadlines on a server with one worker and max_queued_requests=1 (room for
2 calls): a third call is refused at once with RESOURCE_EXHAUSTED and RetryInfo, admitted calls
finish, and work whose caller is gone (deadline passed, stream cancelled) is never computed.

The single worker is held busy by a task the test submits to the server's real pool, so the
searches behind it queue exactly as they would behind slow ones.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from colgrid_client import Client, DeadlineExceededError, ResourceExhaustedError
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from tests.conftest import start_live_server, stop_live_server
from tests.test_metrics import Scrape, free_port


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def narrow(served_data_dir: Path):
    port = free_port()
    server, thread = start_live_server(served_data_dir, worker_threads=1, max_queued_requests=1,
                                       metrics_port=port, metrics_host="127.0.0.1")
    server.metrics_port = port
    yield server
    stop_live_server(server, thread)


@pytest.fixture()
def pool(narrow):
    return narrow.running.executor


@pytest.fixture()
def busy_worker(narrow, pool) -> Iterator[threading.Event]:
    """Occupies the only worker until the test sets the event (and always by teardown)."""
    release = threading.Event()
    pool.submit(release.wait, 60)
    wait_until(lambda: pool.running == 1, "the worker is busy")
    yield release
    release.set()
    wait_until(lambda: pool.running == 0 and pool.queued == 0, "the pool is idle")
    wait_until(lambda: Scrape(narrow.metrics_port).value("colgrid_in_flight") == 0, "nothing is in flight")


@pytest.fixture()
def stub(narrow) -> Iterator[pb_grpc.SearchServiceStub]:
    with grpc.insecure_channel(narrow.target) as channel:
        yield pb_grpc.SearchServiceStub(channel)


def request(query: str = "open a file") -> pb.SearchRequest:
    return pb.SearchRequest(index="docs", query=query, k=3)


def fill(stub, pool) -> list[grpc.Future]:
    """Two searches: both admitted, both queued behind the busy worker; the server is full."""
    calls = [stub.Search.future(request(q), timeout=60) for q in ("read a file", "parse json")]
    wait_until(lambda: pool.queued == 2, "both searches are queued")
    return calls


def test_a_call_beyond_the_limit_is_refused_with_retry_info(narrow, busy_worker, stub, pool):
    calls = fill(stub, pool)
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request("sort a list"), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "overloaded" in info.value.details()
    details = rpc_status.from_call(info.value).details
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR))
    assert retry.retry_delay.ToTimedelta().total_seconds() > 0
    busy_worker.set()
    assert all(len(call.result(timeout=60).hits) == 3 for call in calls)


def test_the_sdk_reports_the_delay_the_server_asked_for(narrow, busy_worker, stub, pool):
    calls = fill(stub, pool)
    with Client(narrow.target, retries=0, timeout=60) as client, pytest.raises(ResourceExhaustedError) as info:
        client.search("docs", "sort a list")
    assert info.value.retry_delay is not None and info.value.retry_delay >= 0.05
    assert info.value.reason == "OVERLOADED"
    busy_worker.set()
    for call in calls:
        call.result(timeout=60)


def test_the_server_serves_again_once_the_queue_drains(narrow, busy_worker, stub, pool):
    calls = fill(stub, pool)
    before = Scrape(narrow.metrics_port)
    with pytest.raises(grpc.RpcError):
        stub.Search(request("sort a list"), timeout=60)
    after = Scrape(narrow.metrics_port)
    assert after.value("colgrid_overload_refusals_total") == before.value("colgrid_overload_refusals_total") + 1
    # The per-method count is taken as the call ends, which can be just after the client sees the status.
    exhausted = dict(method="colgrid.v1.SearchService/Search", code="RESOURCE_EXHAUSTED")
    counted = before.value("colgrid_requests_total", **exhausted)
    wait_until(lambda: Scrape(narrow.metrics_port).value("colgrid_requests_total", **exhausted) == counted + 1,
               "the refused call is counted as RESOURCE_EXHAUSTED")
    busy_worker.set()
    for call in calls:
        call.result(timeout=60)
    assert len(stub.Search(request("sort a list"), timeout=60).hits) == 3


def test_a_search_whose_deadline_passes_while_queued_is_never_computed(narrow, busy_worker, pool):
    dropped, completed = pool.dropped, pool.completed
    expired = dict(method="colgrid.v1.SearchService/Search", code="DEADLINE_EXCEEDED")
    counted = Scrape(narrow.metrics_port).value("colgrid_requests_total", **expired)
    with Client(narrow.target, retries=0) as client, pytest.raises(DeadlineExceededError):
        client.search("docs", "open a file", timeout=0.5)
    wait_until(lambda: pool.dropped == dropped + 1, "the queued search is dropped")
    wait_until(lambda: Scrape(narrow.metrics_port).value("colgrid_requests_total", **expired) == counted + 1,
               "the expired call is counted as DEADLINE_EXCEEDED")
    busy_worker.set()
    wait_until(lambda: pool.running == 0, "the worker is free")
    assert pool.completed == completed + 1  # the blocking task only: the search never ran


def test_cancelling_a_stream_drops_its_queued_work(narrow, busy_worker, stub, pool):
    dropped, completed = pool.dropped, pool.completed
    hold = threading.Event()

    def requests() -> Iterator[pb.SearchRequest]:
        yield request()
        hold.wait(60)  # keep the stream open with one query in it

    call = stub.SearchStream(requests(), timeout=60)
    wait_until(lambda: pool.queued == 1, "the stream's query is queued")
    call.cancel()
    wait_until(lambda: pool.dropped == dropped + 1, "the cancelled stream's query is dropped")
    hold.set()
    busy_worker.set()
    wait_until(lambda: pool.running == 0, "the worker is free")
    assert pool.completed == completed + 1


def test_a_new_stream_is_refused_when_the_server_is_full(narrow, busy_worker, stub, pool):
    calls = fill(stub, pool)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.SearchStream(iter([request()]), timeout=60))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    busy_worker.set()
    for call in calls:
        call.result(timeout=60)


def test_an_open_stream_waits_for_room_instead_of_failing(narrow, stub, pool):
    queries: queue.Queue[pb.SearchRequest | None] = queue.Queue()
    stream = stub.SearchStream(iter(queries.get, None), timeout=60)
    queries.put(request("join paths"))
    assert len(next(stream).hits) == 3  # admitted, and answered while the server had room
    release = threading.Event()
    pool.submit(release.wait, 60)
    wait_until(lambda: pool.running == 1, "the worker is busy")
    calls = fill(stub, pool)
    queries.put(request("split a string"))
    wait_until(lambda: Scrape(narrow.metrics_port).value("colgrid_stream_messages_waiting") == 1,
               "the stream's next query waits for room")
    release.set()
    assert len(next(stream).hits) == 3
    queries.put(None)
    assert list(stream) == []
    for call in calls:
        call.result(timeout=60)


def test_health_and_rollouts_answer_while_the_server_is_full(narrow, busy_worker, stub, pool):
    calls = fill(stub, pool)
    with grpc.insecure_channel(narrow.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        rollout = pb_grpc.RolloutServiceStub(channel).GetRollout(pb.GetRolloutRequest(index="docs"), timeout=10)
        assert rollout.rollout.stable
    busy_worker.set()
    for call in calls:
        call.result(timeout=60)
