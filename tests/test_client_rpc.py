"""The real client over a real channel, against a small scripted gRPC server on port 0.

The server implements the generated servicers and answers each call from a script (canned
responses, or aborts with a given status and google.rpc.Status details), so these tests pin the
client's behaviour independently of the colgrid server's search code.
"""
from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import colgrid_client as cg
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Abort:
    """A scripted failure: status code, message, optional google.rpc details and trailers."""

    code: grpc.StatusCode
    message: str = "scripted failure"
    details: tuple[Any, ...] = ()
    trailers: tuple[tuple[str, str], ...] = ()


Outcome = Any  # a response message, an Abort, or a callable(request, context) -> either


class ScriptedColgrid(pb_grpc.SearchServiceServicer, pb_grpc.EncodeServiceServicer,
                      pb_grpc.RegistryServiceServicer):
    """Answers each method from `script[method]`: outcomes used in order, the last one repeats."""

    def __init__(self) -> None:
        self.script: dict[str, list[Outcome]] = {}
        self.requests: dict[str, list[Any]] = defaultdict(list)
        self.metadata: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.stream_cancelled = threading.Event()

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests[method].append(request)
        self.metadata[method].append(dict(context.invocation_metadata()))
        plan = self.script[method]
        outcome = plan.pop(0) if len(plan) > 1 else plan[0]
        if callable(outcome):
            outcome = outcome(request, context)
        if isinstance(outcome, Abort):
            _abort(context, outcome)
        return outcome

    def Search(self, request, context):  # noqa: N802 - generated servicer names
        return self._answer("Search", request, context)

    def SearchStream(self, request_iterator, context):  # noqa: N802
        context.add_callback(self.stream_cancelled.set)
        for request in request_iterator:
            yield self._answer("SearchStream", request, context)

    def EncodeQuery(self, request, context):  # noqa: N802
        return self._answer("EncodeQuery", request, context)

    def EncodeDocuments(self, request, context):  # noqa: N802
        return self._answer("EncodeDocuments", request, context)

    def ListIndexes(self, request, context):  # noqa: N802
        return self._answer("ListIndexes", request, context)

    def GetIndex(self, request, context):  # noqa: N802
        return self._answer("GetIndex", request, context)

    def ListVersions(self, request, context):  # noqa: N802
        return self._answer("ListVersions", request, context)

    def GetVersion(self, request, context):  # noqa: N802
        return self._answer("GetVersion", request, context)


def _abort(context: grpc.ServicerContext, outcome: Abort) -> None:
    if outcome.details:
        packed = []
        for detail in outcome.details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = rpc_status.to_status(status_pb2.Status(
            code=getattr(code_pb2, outcome.code.name), message=outcome.message, details=packed))
        context.set_trailing_metadata(outcome.trailers)
        context.abort_with_status(status)
    context.set_trailing_metadata(outcome.trailers)
    context.abort(outcome.code, outcome.message)


@pytest.fixture
def colgrid() -> Iterator[tuple[ScriptedColgrid, str]]:
    servicer = ScriptedColgrid()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SearchServiceServicer_to_server(servicer, server)
    pb_grpc.add_EncodeServiceServicer_to_server(servicer, server)
    pb_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def server(colgrid: tuple[ScriptedColgrid, str]) -> ScriptedColgrid:
    return colgrid[0]


@pytest.fixture
def client(colgrid: tuple[ScriptedColgrid, str]) -> Iterator[cg.Client]:
    with cg.Client(colgrid[1], timeout=5.0, backoff=0.01) as c:
        yield c


def _echo(version: str = "v1") -> Callable[[Any, Any], pb.SearchResponse]:
    """A search answer naming the query and echoing the request id, as the real server does."""
    def answer(request: pb.SearchRequest, context: Any) -> pb.SearchResponse:
        return pb.SearchResponse(request_id=request.request_id, index=request.index,
                                 version=version, hits=[pb.Hit(doc_id=request.query, rank=1,
                                                               score=float(request.k))])
    return answer


def _vector(rows: list[list[float]], tokens: list[str]) -> pb.MultiVector:
    flat = [v for row in rows for v in row]
    return pb.MultiVector(rows=len(rows), dim=len(rows[0]), data=struct.pack(f"<{len(flat)}f",
                                                                             *flat), tokens=tokens)


# --- unary calls -------------------------------------------------------------------------------

def test_search_sends_its_request_id_as_field_and_metadata(server, client) -> None:
    server.script["Search"] = [_echo("v7")]
    result = client.search("docs", "cats", k=4)
    sent = server.requests["Search"][0]
    assert result.request_id == sent.request_id != ""
    assert server.metadata["Search"][0]["x-request-id"] == sent.request_id
    assert (result.version, result[0].doc_id, result[0].score, result[0].version) == (
        "v7", "cats", 4.0, "v7")


def test_search_with_query_vectors_sends_them_instead_of_text(server, client) -> None:
    server.script["Search"] = [_echo()]
    client.search("docs", query_vectors=[[0.5, 0.5], [1.0, 0.0]])
    sent = server.requests["Search"][0]
    assert (sent.query, sent.query_vectors.rows, sent.query_vectors.dim) == ("", 2, 2)


def test_encode_query_returns_a_matrix_with_tokens(server, client) -> None:
    server.script["EncodeQuery"] = [pb.EncodeResponse(encoder_id="enc", vectors=[
        _vector([[1.0, 0.0], [0.0, 1.0]], ["[Q]", "cats"])])]
    matrix = client.encode_query("docs", "cats")
    assert (matrix.shape, matrix.tokens, matrix[1]) == ((2, 2), ("[Q]", "cats"), [0.0, 1.0])
    assert server.requests["EncodeQuery"][0].index == "docs"


def test_encode_documents_returns_one_matrix_per_text_by_encoder_id(server, client) -> None:
    server.script["EncodeDocuments"] = [pb.EncodeResponse(vectors=[
        _vector([[1.0]], ["a"]), _vector([[2.0], [3.0]], ["b", "c"])])]
    matrices = client.encode_documents(None, ["a", "b c"], encoder_id="enc")
    assert [m.tolist() for m in matrices] == [[[1.0]], [[2.0], [3.0]]]
    assert server.requests["EncodeDocuments"][0].encoder_id == "enc"


def test_encode_documents_with_a_missing_answer_is_an_internal_error(server, client) -> None:
    server.script["EncodeDocuments"] = [pb.EncodeResponse(vectors=[_vector([[1.0]], ["a"])])]
    with pytest.raises(cg.InternalError, match="2 texts with 1"):
        client.encode_documents("docs", ["a", "b"])


def test_registry_calls_return_dataclasses(server, client) -> None:
    rollout = pb.Rollout(index="docs", stable="v2", canary="v3", canary_percent=10, generation=5)
    server.script["ListIndexes"] = [pb.ListIndexesResponse(indexes=[
        pb.IndexInfo(name="docs", rollout=rollout, versions=3, loaded=True)])]
    server.script["GetIndex"] = [pb.IndexInfo(name="docs", rollout=rollout)]
    server.script["ListVersions"] = [pb.ListVersionsResponse(versions=[
        pb.Version(index="docs", version="v2", state=pb.READY, documents=10)])]
    server.script["GetVersion"] = [pb.Version(index="docs", version="v3", state=pb.BUILDING)]
    (info,) = client.list_indexes()
    assert (info.name, info.versions, info.loaded, info.rollout.canary_percent) == (
        "docs", 3, True, 10)
    assert client.get_index("docs").rollout == cg.Rollout(index="docs", stable="v2", canary="v3",
                                                          canary_percent=10, generation=5)
    assert [v.state for v in client.list_versions("docs")] == [cg.VersionState.READY]
    assert client.get_version("docs", "v3").state is cg.VersionState.BUILDING
    assert server.requests["GetVersion"][0].version == "v3"


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "error"), [
    (grpc.StatusCode.INVALID_ARGUMENT, cg.InvalidArgumentError),
    (grpc.StatusCode.OUT_OF_RANGE, cg.InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, cg.NotFoundError),
    (grpc.StatusCode.FAILED_PRECONDITION, cg.FailedPreconditionError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, cg.ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, cg.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, cg.DeadlineExceededError),
    (grpc.StatusCode.ABORTED, cg.AbortedError),
    (grpc.StatusCode.PERMISSION_DENIED, cg.PermissionDeniedError),
    (grpc.StatusCode.UNAUTHENTICATED, cg.UnauthenticatedError),
    (grpc.StatusCode.INTERNAL, cg.InternalError),
    (grpc.StatusCode.UNKNOWN, cg.InternalError),
    (grpc.StatusCode.DATA_LOSS, cg.InternalError),
    (grpc.StatusCode.UNIMPLEMENTED, cg.ColgridError),
    (grpc.StatusCode.ALREADY_EXISTS, cg.ColgridError),
])
def test_each_status_code_raises_its_exception(server, colgrid, code, error) -> None:
    server.script["GetIndex"] = [Abort(code, f"scripted {code.name}")]
    with cg.Client(colgrid[1], timeout=5.0, retries=0) as c, pytest.raises(error) as info:
        c.get_index("docs")
    assert type(info.value) is error
    assert (info.value.code, info.value.details) == (code, f"scripted {code.name}")
    assert info.value.request_id == server.metadata["GetIndex"][0]["x-request-id"]
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_rich_status_details_are_parsed(server, client) -> None:
    server.script["Search"] = [Abort(grpc.StatusCode.INVALID_ARGUMENT, "k too large", details=(
        error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="colgrid",
                                    metadata={"limit": "1000"}),
        error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="k", description="k too large")]),
    ))]
    with pytest.raises(cg.InvalidArgumentError) as info:
        client.search("docs", "cats", k=5000)
    error = info.value
    assert error.field_violations == (cg.FieldViolation("k", "k too large"),)
    assert (error.reason, error.domain, error.error_metadata) == (
        "INVALID_ARGUMENT", "colgrid", {"limit": "1000"})


def test_resource_info_names_what_was_not_found(server, client) -> None:
    server.script["GetVersion"] = [Abort(grpc.StatusCode.NOT_FOUND, "no version v9", details=(
        error_details_pb2.ResourceInfo(resource_type="version", resource_name="docs/v9",
                                       description="no version v9"),))]
    with pytest.raises(cg.NotFoundError) as info:
        client.get_version("docs", "v9")
    assert info.value.resource_info == cg.ResourceInfo("version", "docs/v9", "", "no version v9")


def test_a_request_id_echoed_in_trailers_wins(server, client) -> None:
    server.script["GetIndex"] = [Abort(grpc.StatusCode.NOT_FOUND, "nope",
                                       trailers=(("x-request-id", "server-side-id"),))]
    with pytest.raises(cg.NotFoundError) as info:
        client.get_index("docs")
    assert info.value.request_id == "server-side-id"


def test_client_side_validation_fails_before_any_call(server, client) -> None:
    server.script["Search"] = [_echo()]
    with pytest.raises(cg.InvalidArgumentError, match="k must be a non-negative integer"):
        client.search("docs", "cats", k=-3)
    assert server.requests["Search"] == []


# --- retries and deadlines ---------------------------------------------------------------------

def test_unavailable_is_retried_until_the_server_answers(server, client) -> None:
    down = Abort(grpc.StatusCode.UNAVAILABLE, "warming up")
    server.script["Search"] = [down, down, _echo()]
    result = client.search("docs", "cats")
    assert len(server.requests["Search"]) == 3
    assert result.hits[0].doc_id == "cats"
    ids = {m["x-request-id"] for m in server.metadata["Search"]}
    assert ids == {result.request_id}  # one logical request, one id, across attempts


def test_invalid_argument_is_never_retried(server, client) -> None:
    server.script["Search"] = [Abort(grpc.StatusCode.INVALID_ARGUMENT, "bad"), _echo()]
    with pytest.raises(cg.InvalidArgumentError):
        client.search("docs", "cats")
    assert len(server.requests["Search"]) == 1


def test_unavailable_is_raised_once_retries_are_spent(server, colgrid) -> None:
    server.script["GetIndex"] = [Abort(grpc.StatusCode.UNAVAILABLE, "down")]
    with cg.Client(colgrid[1], retries=2, backoff=0.01) as c, pytest.raises(cg.UnavailableError):
        c.get_index("docs")
    assert len(server.requests["GetIndex"]) == 3


def test_server_retry_info_sets_a_floor_on_the_backoff(server, client) -> None:
    server.script["GetIndex"] = [
        Abort(grpc.StatusCode.UNAVAILABLE, "busy", details=(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(nanos=200_000_000)),)),
        pb.IndexInfo(name="docs")]
    start = time.monotonic()
    assert client.get_index("docs").name == "docs"
    assert time.monotonic() - start >= 0.2


def test_an_overloaded_server_asking_for_a_retry_delay_is_retried_after_it(server, client) -> None:
    server.script["GetIndex"] = [
        Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", details=(error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(nanos=150_000_000)),)),
        pb.IndexInfo(name="docs")]
    start = time.monotonic()
    assert client.get_index("docs").name == "docs"
    assert time.monotonic() - start >= 0.15 and len(server.requests["GetIndex"]) == 2


def test_resource_exhausted_without_a_retry_delay_is_not_retried(server, client) -> None:
    server.script["GetIndex"] = [Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many texts"),
                                 pb.IndexInfo(name="docs")]
    with pytest.raises(cg.ResourceExhaustedError):
        client.get_index("docs")
    assert len(server.requests["GetIndex"]) == 1


def test_slow_answer_past_the_timeout_raises_deadline_exceeded(server, client) -> None:
    def stall(request: Any, context: grpc.ServicerContext) -> pb.IndexInfo:
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(5)
        return pb.IndexInfo(name="late")

    server.script["GetIndex"] = [stall]
    start = time.monotonic()
    with pytest.raises(cg.DeadlineExceededError) as info:
        client.get_index("docs", timeout=0.2)
    assert time.monotonic() - start < 2
    assert isinstance(info.value, TimeoutError)


def test_nothing_listening_raises_unavailable_after_retries() -> None:
    with cg.Client("127.0.0.1:1", timeout=5.0, retries=1, backoff=0.01) as c:
        with pytest.raises(cg.UnavailableError):
            c.list_indexes()


# --- streams -----------------------------------------------------------------------------------

def test_stream_yields_results_in_query_order_with_request_ids(server, client) -> None:
    server.script["SearchStream"] = [_echo("v3")]
    queries = ["a", {"query": "b", "k": 2}, {"query": "c", "request_id": "mine"}, "d"]
    results = list(client.search_stream("docs", queries, k=7))
    assert [r.hits[0].doc_id for r in results] == ["a", "b", "c", "d"]
    assert [r.hits[0].score for r in results] == [7.0, 2.0, 7.0, 7.0]
    prefix = results[0].request_id.rsplit("-", 1)[0]
    assert [r.request_id for r in results] == [f"{prefix}-0", f"{prefix}-1", "mine", f"{prefix}-3"]
    assert {r.version for r in results} == {"v3"}


def test_stream_answer_out_of_order_is_an_internal_error(server, client) -> None:
    server.script["SearchStream"] = [lambda request, context: pb.SearchResponse(
        request_id="someone-else")]
    with pytest.raises(cg.InternalError, match="arrived where"):
        list(client.search_stream("docs", ["a", "b"]))


def test_stream_failure_names_the_query_in_flight(server, client) -> None:
    server.script["SearchStream"] = [_echo(), Abort(grpc.StatusCode.NOT_FOUND, "index gone")]
    stream = client.search_stream("docs", ["a", {"query": "b", "request_id": "second"}])
    assert next(stream).hits[0].doc_id == "a"
    with pytest.raises(cg.NotFoundError) as info:
        next(stream)
    assert info.value.request_id == "second"


def test_stream_delivers_earlier_answers_before_a_bad_query_error(server, client) -> None:
    server.script["SearchStream"] = [_echo()]
    results = []
    with pytest.raises(cg.InvalidArgumentError, match="unknown stream query keys"):
        for result in client.search_stream("docs", ["a", "b", {"query": "c", "kk": 1}]):
            results.append(result.hits[0].doc_id)
    assert results == ["a", "b"]


def test_stream_bad_defaults_fail_at_the_call_not_at_iteration(client) -> None:
    with pytest.raises(cg.InvalidArgumentError, match="nprobe"):
        client.search_stream("docs", ["a"], nprobe=-1)


def test_stopping_a_stream_early_cancels_it_on_the_server(server, client) -> None:
    server.script["SearchStream"] = [_echo()]

    def endless() -> Iterator[str]:
        while True:
            yield "q"

    stream = client.search_stream("docs", endless())
    assert next(stream).hits[0].doc_id == "q"
    stream.close()
    assert server.stream_cancelled.wait(5)


# --- the asyncio client ------------------------------------------------------------------------

def test_async_client_searches_and_retries_unavailable(server, colgrid) -> None:
    down = Abort(grpc.StatusCode.UNAVAILABLE, "warming up")
    server.script["Search"] = [down, _echo("v5")]

    async def main() -> cg.SearchResult:
        async with cg.AsyncClient(colgrid[1], timeout=5.0, backoff=0.01) as c:
            return await c.search("docs", "cats", k=2)

    result = asyncio.run(main())
    assert (result.version, result.hits[0].doc_id) == ("v5", "cats")
    assert len(server.requests["Search"]) == 2


def test_async_client_maps_errors_with_rich_details(server, colgrid) -> None:
    server.script["GetVersion"] = [Abort(grpc.StatusCode.FAILED_PRECONDITION, "not ready",
                                         details=(error_details_pb2.ErrorInfo(
                                             reason="VERSION_NOT_READY", domain="colgrid"),))]

    async def main() -> None:
        async with cg.AsyncClient(colgrid[1], timeout=5.0) as c:
            await c.get_version("docs", "v2")

    with pytest.raises(cg.FailedPreconditionError) as info:
        asyncio.run(main())
    assert info.value.reason == "VERSION_NOT_READY"
    assert len(server.requests["GetVersion"]) == 1


def test_async_client_deadline_raises_deadline_exceeded(server, colgrid) -> None:
    def stall(request: Any, context: grpc.ServicerContext) -> pb.IndexInfo:
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(5)
        return pb.IndexInfo(name="late")

    server.script["ListIndexes"] = [stall]

    async def main() -> None:
        async with cg.AsyncClient(colgrid[1]) as c:
            await c.list_indexes(timeout=0.2)

    with pytest.raises(cg.DeadlineExceededError):
        asyncio.run(main())


async def _async_queries():
    for q in ("x", "y", "z"):
        yield q


@pytest.mark.parametrize("make_queries", [lambda: ["x", "y", "z"], _async_queries],
                         ids=["list", "async-generator"])
def test_async_stream_yields_in_query_order(server, colgrid, make_queries) -> None:
    server.script["SearchStream"] = [_echo()]

    async def main() -> list[cg.SearchResult]:
        async with cg.AsyncClient(colgrid[1], timeout=5.0) as c:
            return [r async for r in c.search_stream("docs", make_queries())]

    results = asyncio.run(main())
    assert [r.hits[0].doc_id for r in results] == ["x", "y", "z"]
    assert [r.request_id.rsplit("-", 1)[1] for r in results] == ["0", "1", "2"]


def test_async_stream_delivers_earlier_answers_before_a_bad_query_error(server, colgrid) -> None:
    server.script["SearchStream"] = [_echo()]
    seen: list[str] = []

    async def main() -> None:
        async with cg.AsyncClient(colgrid[1], timeout=5.0) as c:
            async for result in c.search_stream("docs", ["a", 42]):
                seen.append(result.hits[0].doc_id)

    with pytest.raises(cg.InvalidArgumentError, match="must be a str or a dict"):
        asyncio.run(main())
    assert seen == ["a"]
