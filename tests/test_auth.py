"""API keys and roles: every colgrid.v1 call needs a key whose roles cover its service; health
and reflection stay open; refusals are logged without the key. Real servers on loopback."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from colgrid_client import AsyncClient, Client, PermissionDeniedError, UnauthenticatedError
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.cli import main as cli_main
from colgrid_server.security import create_key, hash_key, read_keys, revoke_key
from tests.conftest import start_live_server, stop_live_server

ROLE_SERVICES = {
    "search": {"SearchService", "EncodeService"},
    "ingest": {"IngestService"},
    "admin": {"RegistryService", "RolloutService", "EvaluationService"},
}
SERVICES = sorted(name for name in pb.DESCRIPTOR.services_by_name)
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
AUTH_LOGGER = "colgrid_server.security.auth"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """One key per role, and one holding all three; the file holds their hashes."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {role: create_key(path, f"{role}-key", [role]) for role in ROLE_SERVICES}
    made["all"] = create_key(path, "all-key", list(ROLE_SERVICES))
    made["file"] = str(path)
    return made


@pytest.fixture(scope="module")
def secured(served_data_dir: Path, keys):
    server, thread = start_live_server(served_data_dir, api_keys_file=keys["file"])
    yield server
    stop_live_server(server, thread)


def call_with_empty_request(target: str, service: str, method, metadata) -> grpc.StatusCode:
    """Call `method` with an empty request (cheap: it fails validation when authorised) and
    return the status it ended with."""
    path = f"/{pb.DESCRIPTOR.package}.{service}/{method.name}"
    request_class = type(pb.__dict__[method.input_type.name]())
    with grpc.insecure_channel(target) as channel:
        kwargs = dict(request_serializer=request_class.SerializeToString, response_deserializer=lambda b: b)
        try:
            if method.client_streaming and method.server_streaming:
                list(channel.stream_stream(path, **kwargs)(iter([request_class()]), metadata=metadata, timeout=30))
            elif method.client_streaming:
                channel.stream_unary(path, **kwargs)(iter([request_class()]), metadata=metadata, timeout=30)
            elif method.server_streaming:
                list(channel.unary_stream(path, **kwargs)(request_class(), metadata=metadata, timeout=30))
            else:
                channel.unary_unary(path, **kwargs)(request_class(), metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", sorted(ROLE_SERVICES))
@pytest.mark.parametrize("service", SERVICES)
def test_each_role_may_call_exactly_its_services(secured, keys, role, service):
    allowed = service in ROLE_SERVICES[role]
    for method in pb.DESCRIPTOR.services_by_name[service].methods:
        code = call_with_empty_request(secured.target, service, method,
                                       (("authorization", f"Bearer {keys[role]}"),))
        if allowed:
            assert code not in REFUSED, f"{role} refused {service}/{method.name}"
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, f"{role} not refused {service}/{method.name}"


@pytest.mark.parametrize("service", SERVICES)
def test_a_key_with_every_role_may_call_every_service(secured, keys, service):
    for method in pb.DESCRIPTOR.services_by_name[service].methods:
        code = call_with_empty_request(secured.target, service, method,
                                       (("authorization", f"Bearer {keys['all']}"),))
        assert code not in REFUSED, f"{service}/{method.name}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_refuses_a_call_without_a_key(secured, service):
    for method in pb.DESCRIPTOR.services_by_name[service].methods:
        assert call_with_empty_request(secured.target, service, method, ()) == grpc.StatusCode.UNAUTHENTICATED


def test_missing_key_is_unauthenticated_and_says_how_to_send_one(secured):
    with Client(secured.target, retries=0) as client, pytest.raises(UnauthenticatedError) as info:
        client.search("docs", "open a file")
    assert "authorization: Bearer" in info.value.details
    assert info.value.reason == "API_KEY_MISSING"


def test_wrong_key_is_unauthenticated(secured, keys):
    with Client(secured.target, api_key=keys["search"] + "x", retries=0) as client:
        with pytest.raises(UnauthenticatedError, match="not recognised") as info:
            client.search("docs", "open a file")
    assert info.value.reason == "API_KEY_INVALID"


def test_authorization_without_bearer_scheme_is_unauthenticated(secured, keys):
    code = call_with_empty_request(secured.target, "SearchService",
                                   pb.DESCRIPTOR.services_by_name["SearchService"].methods_by_name["Search"],
                                   (("authorization", f"Basic {keys['search']}"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_x_api_key_metadata_is_accepted(secured, keys):
    code = call_with_empty_request(secured.target, "RegistryService",
                                   pb.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name["ListIndexes"],
                                   (("x-api-key", keys["admin"]),))
    assert code == grpc.StatusCode.OK


def test_permission_denied_names_the_key_and_the_role_it_lacks(secured, keys):
    with Client(secured.target, api_key=keys["search"], retries=0) as client:
        with pytest.raises(PermissionDeniedError) as info:
            client.get_rollout("docs")
    error = info.value
    assert "'search-key'" in error.details and "admin" in error.details
    assert error.reason == "ROLE_MISSING" and error.error_metadata["required_role"] == "admin"


def test_search_key_searches_and_streams_with_the_client(secured, keys):
    with Client(secured.target, api_key=keys["search"], retries=0) as client:
        assert client.search("docs", "open a file", k=3).hits
        results = list(client.search_stream("docs", ["read a file", "parse json"], k=2))
        assert [len(r.hits) for r in results] == [2, 2]
        assert client.encode_query("docs", "open a file").rows > 0


def test_async_client_sends_its_key_on_unary_calls_and_streams(secured, keys):
    async def run() -> tuple[int, list[int]]:
        async with AsyncClient(secured.target, api_key=keys["search"], retries=0) as client:
            hits = len((await client.search("docs", "open a file", k=3)).hits)
            streamed = [len(r.hits) async for r in client.search_stream("docs", ["read a file", "sort a list"], k=2)]
            return hits, streamed

    assert asyncio.run(run()) == (3, [2, 2])


def test_admin_key_reads_the_registry_with_the_client(secured, keys):
    with Client(secured.target, api_key=keys["admin"], retries=0) as client:
        assert "docs" in {i.name for i in client.list_indexes()}
        assert client.get_rollout("docs").rollout.stable


def test_health_answers_without_a_key(secured):
    with grpc.insecure_channel(secured.target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_answers_without_a_key(secured):
    with grpc.insecure_channel(secured.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=30))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "colgrid.v1.SearchService" in names


def test_a_method_the_server_lacks_is_refused_without_a_key(secured):
    with grpc.insecure_channel(secured.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/colgrid.v1.NoSuchService/Nothing")(b"", timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_refusals_are_logged_with_key_name_method_and_peer_never_the_key(secured, keys, caplog):
    caplog.set_level(logging.WARNING, logger=AUTH_LOGGER)
    with Client(secured.target, api_key=keys["search"], retries=0) as client, pytest.raises(PermissionDeniedError):
        client.list_indexes()
    with Client(secured.target, api_key=keys["ingest"] + "typo", retries=0) as client, \
            pytest.raises(UnauthenticatedError):
        client.search("docs", "open a file")
    records = [r for r in caplog.records if r.name == AUTH_LOGGER]
    denied = next(r for r in records if r.code == "PERMISSION_DENIED")
    assert denied.key_name == "search-key" and denied.method == "colgrid.v1.RegistryService/ListIndexes"
    assert "127.0.0.1" in denied.peer
    unknown = next(r for r in records if r.reason == "API_KEY_INVALID")
    assert unknown.key_fingerprint == hash_key(keys["ingest"] + "typo")[:8]
    text = caplog.text + " ".join(json.dumps(vars(r), default=str) for r in records)
    for key in (keys["search"], keys["ingest"], keys["ingest"] + "typo"):
        assert key not in text


def test_key_file_holds_hashes_only(keys):
    stored = Path(keys["file"]).read_text()
    assert all(keys[role] not in stored for role in ("search", "ingest", "admin", "all"))
    assert {k.key_sha256 for k in read_keys(Path(keys["file"]))} == {
        hash_key(keys[r]) for r in ("search", "ingest", "admin", "all")}


def test_keys_created_and_revoked_take_effect_without_a_restart(served_data_dir, tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, "first", ["admin"])
    server, thread = start_live_server(served_data_dir, api_keys_file=str(path))
    try:
        later = create_key(path, "later", ["admin"])
        deadline = time.monotonic() + 10
        with Client(server.target, api_key=later, retries=0) as client:
            while True:  # the server re-reads the file within a second of a change
                try:
                    client.list_indexes()
                    break
                except UnauthenticatedError:
                    assert time.monotonic() < deadline, "new key never accepted"
                    time.sleep(0.2)
            revoke_key(path, "later")
            with pytest.raises(UnauthenticatedError):
                while time.monotonic() < deadline:
                    client.list_indexes()
                    time.sleep(0.2)
    finally:
        stop_live_server(server, thread)


def test_cli_creates_a_key_printed_once_that_the_server_accepts(secured, keys, capsys):
    assert cli_main(["keys", "create", "cli-made", "--role", "admin", "--file", keys["file"]]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("cgk_") and "\n" not in out and out not in Path(keys["file"]).read_text()
    with Client(secured.target, api_key=out, retries=0) as client:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.list_indexes()
                break
            except UnauthenticatedError:
                assert time.monotonic() < deadline
                time.sleep(0.2)


def test_cli_refuses_an_unknown_role(tmp_path, capsys):
    assert cli_main(["keys", "create", "x", "--role", "superuser", "--file", str(tmp_path / "k.json")]) == 1
    assert "unknown role" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()


def test_server_refuses_to_start_with_an_unreadable_key_file(served_data_dir, tmp_path):
    from colgrid_server.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="colgrid keys create"):
        start_live_server(served_data_dir, api_keys_file=str(tmp_path / "missing.json"))


def test_listening_beyond_loopback_without_keys_logs_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    server, thread = start_live_server(tmp_path, host="0.0.0.0")
    try:
        assert any("without authentication" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records)
    finally:
        stop_live_server(server, thread)


def test_loopback_without_keys_logs_no_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    server, thread = start_live_server(tmp_path)
    try:
        assert not any("without authentication" in r.getMessage() for r in caplog.records)
    finally:
        stop_live_server(server, thread)


# --- input hardening: names reach the filesystem, so hostile ones must stop at the door -------

HOSTILE_NAMES = ["../docs", "docs/../../etc", "..", "docs\x00", "do\ncs", "/etc/passwd", "docs\\x", "DOCS"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_index_names_are_refused_by_every_rpc_taking_one(secured, keys, name):
    metadata = (("authorization", f"Bearer {keys['all']}"),)
    eval_query = pb.EvalQuery(query_id="q1", text="parse json", judgements=[pb.Judgement(doc_id="json", relevance=1)])

    with grpc.insecure_channel(secured.target) as channel:
        calls = {
            "Search": lambda: pb_grpc.SearchServiceStub(channel).Search(
                pb.SearchRequest(index=name, query="open a file"), metadata=metadata, timeout=30),
            "SearchStream": lambda: list(pb_grpc.SearchServiceStub(channel).SearchStream(
                iter([pb.SearchRequest(index=name, query="open a file")]), metadata=metadata, timeout=30)),
            "EncodeQuery": lambda: pb_grpc.EncodeServiceStub(channel).EncodeQuery(
                pb.EncodeQueryRequest(index=name, text="open a file"), metadata=metadata, timeout=30),
            "GetIndex": lambda: pb_grpc.RegistryServiceStub(channel).GetIndex(
                pb.GetIndexRequest(index=name), metadata=metadata, timeout=30),
            "GetVersion": lambda: pb_grpc.RegistryServiceStub(channel).GetVersion(
                pb.GetVersionRequest(index="docs", version=name), metadata=metadata, timeout=30),
            "GetRollout": lambda: pb_grpc.RolloutServiceStub(channel).GetRollout(
                pb.GetRolloutRequest(index=name), metadata=metadata, timeout=30),
            "SetStable": lambda: pb_grpc.RolloutServiceStub(channel).SetStable(
                pb.SetStableRequest(index="docs", version=name), metadata=metadata, timeout=30),
            "Explain(index)": lambda: pb_grpc.SearchServiceStub(channel).Explain(
                pb.ExplainRequest(index=name, doc_id="json", query="parse json"), metadata=metadata, timeout=30),
            "Explain(version)": lambda: pb_grpc.SearchServiceStub(channel).Explain(
                pb.ExplainRequest(index="docs", version=name, doc_id="json", query="parse json"),
                metadata=metadata, timeout=30),
            "Evaluate(index)": lambda: pb_grpc.EvaluationServiceStub(channel).Evaluate(
                pb.EvaluateRequest(index=name, queries=[eval_query]), metadata=metadata, timeout=30),
            "Evaluate(versions)": lambda: pb_grpc.EvaluationServiceStub(channel).Evaluate(
                pb.EvaluateRequest(index="docs", versions=[name], queries=[eval_query]), metadata=metadata,
                timeout=30),
            "Ingest": lambda: list(pb_grpc.IngestServiceStub(channel).Ingest(
                iter([pb.IngestRequest(options=pb.IngestOptions(index=name)),
                      pb.IngestRequest(document=pb.IngestDocument(id="d1", text="hello"))]),
                metadata=metadata, timeout=30)),
        }
        for rpc, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, info.value.details())
            assert re.search(r"invalid (index|version) name", info.value.details()), (rpc, info.value.details())
