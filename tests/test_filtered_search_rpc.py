"""Filters through the API: Search and SearchStream with metadata conditions and document ids
on the live server's 400 stdlib docstrings (metadata: module, kind, source, line), the CLI's
--filter, and malformed filters refused with INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import json

import grpc
import pytest

from colgrid_client import InvalidArgumentError
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc


def test_every_hit_satisfies_the_filter(client):
    result = client.search("docs", "parse a JSON document", k=10, filter={"kind": "function"})
    assert len(result.hits) == 10 and {h.metadata["kind"] for h in result.hits} == {"function"}
    ranged = client.search("docs", "open a file", k=5, filter={"line": {"gte": 100, "lt": 500}, "kind": {"not": "module"}})
    assert ranged.hits and all(100 <= h.metadata["line"] < 500 and h.metadata["kind"] != "module" for h in ranged.hits)


def test_a_filtered_search_finds_what_exhaustive_search_over_the_permitted_documents_finds(client):
    where = {"module": ["json", "os", "re", "abc", "string"]}
    got = client.search("docs", "split a string", k=5, filter=where)
    want = client.search("docs", "split a string", k=5, filter=where, exhaustive=True)
    assert [h.doc_id for h in got.hits] == [h.doc_id for h in want.hits]
    assert {h.metadata["module"] for h in got.hits} <= set(where["module"])


def test_document_ids_restrict_the_search_to_those_documents(client):
    everything = client.search("docs", "read a file", k=20)
    chosen = [h.doc_id for h in everything.hits[5:12]]
    result = client.search("docs", "read a file", k=10, doc_ids=chosen + ["not-a-document"])
    assert [h.doc_id for h in result.hits] == chosen  # the same order: the same scores


def test_a_filter_no_document_passes_gives_no_hits(client):
    assert client.search("docs", "read a file", filter={"kind": "no-such-kind"}).hits == ()


def test_each_stream_query_can_carry_its_own_filter(client):
    results = list(client.search_stream("docs", ["open a file", {"query": "open a file", "filter": {"kind": "class"}}],
                                        k=5, filter={"kind": "function"}))
    assert {h.metadata["kind"] for h in results[0].hits} == {"function"}
    assert {h.metadata["kind"] for h in results[1].hits} == {"class"}


@pytest.mark.parametrize("condition, field", [
    (pb.FieldCondition(field=""), "filter.must[0].field"),
    (pb.FieldCondition(field="kind"), "filter.must[0]"),
    (pb.FieldCondition(field="line", gte=1, any_of=[{"number_value": 3}]), "filter.must[0]"),
    (pb.FieldCondition(field="kind", any_of=[{"null_value": 0}]), "filter.must[0].any_of"),
])
def test_a_malformed_filter_is_invalid_argument_naming_the_field(live_server, condition, field):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    request = pb.SearchRequest(index="docs", query="open a file", filter=pb.Filter(must=[condition]))
    with grpc.insecure_channel(live_server.target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.SearchServiceStub(channel).Search(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(info.value).details)
    assert [v.field for v in bad.field_violations] == [field]


def test_the_client_refuses_a_filter_it_cannot_send(client):
    with pytest.raises(InvalidArgumentError, match="not a string, number or boolean"):
        client.search("docs", "x", filter={"kind": {"nested": "object"}.items()})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgumentError, match="unknown keys"):
        client.search("docs", "x", filter={"line": {"between": [1, 2]}})


def test_the_cli_passes_a_json_filter(live_server, capsys):
    from colgrid_server.cli import main

    assert main(["search", "docs", "open a file", "-k", "3", "--filter", '{"kind": "class"}', "--json",
                 "--target", live_server.target]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and {h["metadata"]["kind"] for h in hits} == {"class"}
    assert main(["search", "docs", "open a file", "--filter", "{kind: class}", "--target", live_server.target]) == 2
    assert "--filter is not JSON" in capsys.readouterr().err
