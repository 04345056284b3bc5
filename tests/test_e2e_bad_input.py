"""Bad input gets a documented status with an actionable message; the server keeps serving."""
from __future__ import annotations

import grpc
import pytest

from colgrid_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc


def assert_still_serving(client) -> None:
    assert client.search("docs", "open a file", k=1).hits


def test_empty_query_is_invalid_argument_naming_the_field(client):
    with pytest.raises(InvalidArgumentError) as info:
        client.search("docs", "   ", k=3)
    assert "query" in {v.field for v in info.value.field_violations}
    assert_still_serving(client)


def test_oversized_query_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="limit"):
        client.search("docs", "word " * 5000, k=3)
    assert_still_serving(client)


def test_unknown_index_is_not_found(client):
    with pytest.raises(NotFoundError) as info:
        client.search("no-such-index", "open a file")
    assert "no-such-index" in str(info.value)
    assert_still_serving(client)


def test_missing_index_name_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="index"):
        client.search("", "open a file")
    assert_still_serving(client)


def test_index_without_a_version_is_failed_precondition(client):
    with pytest.raises(FailedPreconditionError, match="no READY version"):
        client.search("empty", "open a file")
    assert_still_serving(client)


@pytest.mark.parametrize("k", [0, -3, 1001, 2**31 - 1])
def test_k_out_of_range_is_invalid_argument(live_server, k):
    # Raw stub: the SDK itself refuses some of these before sending.
    with grpc.insecure_channel(live_server.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(index="docs", query="open a file", k=k), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "k" in info.value.details()
        ok = stub.Search(pb.SearchRequest(index="docs", query="open a file", k=2), timeout=30)
    assert len(ok.hits) == 2


@pytest.mark.parametrize("field", ["nprobe", "n_candidates"])
def test_non_positive_knobs_are_invalid_argument(live_server, field):
    with grpc.insecure_channel(live_server.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(index="docs", query="open a file", **{field: -1}), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_query_vectors_with_the_wrong_dim_are_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="dim"):
        client.search("docs", "", query_vectors=[[0.1] * 10, [0.2] * 10])
    assert_still_serving(client)


def test_nan_query_vectors_are_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="NaN"):
        client.search("docs", "", query_vectors=[[float("nan")] * 384])
    assert_still_serving(client)


def test_truncated_vector_bytes_are_invalid_argument(live_server):
    mv = pb.MultiVector(rows=2, dim=384, data=b"\x00" * 100)
    with grpc.insecure_channel(live_server.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(index="docs", query_vectors=mv), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_request_in_a_stream_ends_it_with_a_status(client):
    with pytest.raises(InvalidArgumentError):
        list(client.search_stream("docs", ["open a file", "   ", "sort a list"], k=2))
    assert_still_serving(client)


def test_too_many_texts_to_encode_is_resource_exhausted(client):
    with pytest.raises(ResourceExhaustedError, match="split"):
        client.encode_documents("docs", ["text"] * 1000)
    assert_still_serving(client)


def test_unknown_encoder_id_is_not_found(client):
    with pytest.raises(NotFoundError, match="encoder"):
        client.encode_query("", "hello", encoder_id="0" * 64)
    assert_still_serving(client)


def test_unknown_version_is_not_found(client):
    with pytest.raises(NotFoundError):
        client.get_version("docs", "v999")
    assert_still_serving(client)


def test_traversal_index_name_is_rejected(client):
    with pytest.raises((InvalidArgumentError, NotFoundError)):
        client.search("../etc", "open a file")
    assert_still_serving(client)
