"""End to end: a real server on port 0, the real client, an index built from real text."""
from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from colgrid_client import Client
from colgrid_registry import open_registry
from colgrid_server.paths import DataDir


def stable_version(data_dir, index: str = "docs") -> str:
    with open_registry(DataDir(data_dir).registry_file) as registry:
        return registry.get_rollout(index).stable


def test_search_answers_from_the_registry_stable_version(client, live_server):
    result = client.search("docs", "serialize an object to a JSON formatted string", k=5)

    assert result.version == stable_version(live_server.data_dir)
    assert result.index == "docs"
    assert 1 <= len(result.hits) <= 5
    assert [h.rank for h in result.hits] == list(range(1, len(result.hits) + 1))
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.version == result.version for h in result.hits)


def test_a_document_text_used_as_query_finds_that_document_first(client, stdlib_documents):
    doc = stdlib_documents[123]
    result = client.search("docs", doc.text[:300], k=3)

    assert result.hits[0].doc_id == doc.id
    assert result.hits[0].metadata["title"] == doc.metadata["title"]


def test_explanations_name_matched_tokens_and_sum_to_the_score(client, stdlib_documents):
    texts = {d.id: d.text for d in stdlib_documents[:400]}
    result = client.search("docs", "read lines from a file", k=5, explain=True)

    assert result.stats.query_tokens > 0
    for hit in result.hits:
        assert len(hit.explanation) == result.stats.query_tokens
        assert math.isclose(sum(m.similarity for m in hit.explanation), hit.score, rel_tol=1e-4, abs_tol=1e-4)
        assert math.isclose(sum(m.share for m in hit.explanation), 1.0, rel_tol=1e-3)
        for m in hit.explanation:
            assert texts[hit.doc_id][m.start:m.end] == m.doc_token
            assert m.contribution == m.similarity


def test_without_explain_hits_carry_no_explanation(client):
    result = client.search("docs", "read lines from a file", k=3)
    assert all(h.explanation == () for h in result.hits)


def test_search_stream_answers_many_queries_in_order(client, stdlib_documents):
    queries = [d.text[:120] for d in stdlib_documents[:40]]
    results = list(client.search_stream("docs", queries, k=3))

    assert len(results) == len(queries)
    ids = [r.request_id for r in results]
    assert len(set(ids)) == len(ids)
    # Answers come back in request order: query i was document i's own text.
    found_self = sum(r.hits[0].doc_id == d.id for r, d in zip(results, stdlib_documents[:40]))
    assert found_self >= 36


def test_stream_results_all_come_from_the_stable_version(client, live_server):
    results = list(client.search_stream("docs", ["open a file", "sort a list", "parse a date"] * 5, k=2))
    assert {r.version for r in results} == {stable_version(live_server.data_dir)}


def test_exhaustive_and_approximate_agree_on_the_top_hit(client):
    approx = client.search("docs", "compress data with zlib", k=5)
    exact = client.search("docs", "compress data with zlib", k=5, exhaustive=True)
    assert approx.hits[0].doc_id == exact.hits[0].doc_id
    assert math.isclose(approx.hits[0].score, exact.hits[0].score, rel_tol=1e-5)


def test_encode_query_returns_one_unit_vector_per_token(client):
    matrix = client.encode_query("docs", "hello world")
    assert matrix.dim == 384
    assert matrix.rows == len(matrix.tokens) >= 2
    for row in matrix.tolist():
        assert math.isclose(sum(x * x for x in row), 1.0, rel_tol=1e-4)


def test_encode_documents_returns_one_matrix_per_text(client):
    matrices = client.encode_documents("docs", ["a short text", "another, somewhat longer text here"])
    assert len(matrices) == 2
    assert matrices[0].rows < matrices[1].rows


def test_precomputed_query_vectors_give_the_same_answer_as_text(client):
    matrix = client.encode_query("docs", "format a string")
    by_text = client.search("docs", "format a string", k=5)
    by_vectors = client.search("docs", "", k=5, query_vectors=matrix)
    assert [h.doc_id for h in by_vectors.hits] == [h.doc_id for h in by_text.hits]


def test_registry_rpcs_list_the_served_index_and_versions(client, live_server):
    names = {i.name: i for i in client.list_indexes()}
    assert names["docs"].loaded
    assert names["docs"].rollout.stable == stable_version(live_server.data_dir)
    versions = client.list_versions("docs")
    assert [v.version for v in versions] == [stable_version(live_server.data_dir)]
    v = client.get_version("docs", versions[0].version)
    assert v.documents == 400 and v.tokens > 400 and v.state == "READY"


def test_health_reports_serving_once_indexes_are_loaded(live_server):
    with grpc.insecure_channel(live_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        search = stub.Check(health_pb2.HealthCheckRequest(service="colgrid.v1.SearchService"), timeout=10)
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert search.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_colgrid_services(live_server):
    with grpc.insecure_channel(live_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"colgrid.v1.SearchService", "colgrid.v1.EncodeService", "colgrid.v1.RegistryService",
            "grpc.health.v1.Health"} <= names


def test_async_client_searches(live_server):
    import asyncio

    from colgrid_client import AsyncClient

    async def run():
        async with AsyncClient(live_server.target, timeout=60) as ac:
            one = await ac.search("docs", "iterate over a directory", k=3)
            many = [r async for r in ac.search_stream("docs", ["join paths", "split a string"], k=2)]
            return one, many

    one, many = asyncio.run(run())
    assert len(one.hits) == 3 and len(many) == 2
