"""The client's one protobuf boundary (`_convert`) and its light Matrix."""
from __future__ import annotations

import pickle
import re
import struct
from array import array

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from colgrid_client import (
    ColgridError, FieldViolation, InternalError, InvalidArgumentError, Matrix, NotFoundError,
    ResourceInfo, VersionState,
)
from colgrid_client import _convert as convert
from colgrid_client._pb import colgrid_pb2 as pb


def _matrix(rows: list[list[float]]) -> Matrix:
    return Matrix.from_rows(rows)


# --- Matrix ------------------------------------------------------------------------------------

def test_matrix_round_trips_through_multivector_bytes() -> None:
    rows = [[0.5, -1.25, 3.0], [0.0, 2.5, -0.75]]
    message = convert.to_multi_vector(rows)
    assert (message.rows, message.dim) == (2, 3)
    assert message.data == struct.pack("<6f", 0.5, -1.25, 3.0, 0.0, 2.5, -0.75)
    assert convert.from_multi_vector(message).tolist() == rows


def test_zero_row_multivector_from_server_becomes_empty_matrix() -> None:
    matrix = convert.from_multi_vector(pb.MultiVector(rows=0, dim=4, data=b""))
    assert matrix.shape == (0, 4)
    assert matrix.tolist() == []
    assert len(matrix) == 0
    assert matrix.to_numpy().shape == (0, 4)


def test_tokens_and_spans_survive_the_round_trip_with_none_for_missing_spans() -> None:
    message = pb.MultiVector(rows=2, dim=1, data=struct.pack("<2f", 1.0, 2.0),
                             tokens=["[Q]", "cat"], span_starts=[-1, 4], span_ends=[-1, 7])
    matrix = convert.from_multi_vector(message)
    assert matrix.tokens == ("[Q]", "cat")
    assert matrix.spans == (None, (4, 7))
    back = convert.to_multi_vector(matrix)
    assert list(back.span_starts) == [-1, 4] and list(back.span_ends) == [-1, 7]
    assert back.data == message.data


def test_matrix_rows_are_indexable_from_both_ends() -> None:
    matrix = _matrix([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert matrix[0] == [1.0, 2.0]
    assert matrix[-1] == [5.0, 6.0]
    assert matrix[1:] == [[3.0, 4.0], [5.0, 6.0]]
    with pytest.raises(IndexError):
        matrix[3]


def test_matrix_to_numpy_is_a_writable_float32_copy() -> None:
    matrix = _matrix([[1.0, 2.0], [3.0, 4.0]])
    arr = matrix.to_numpy()
    assert arr.dtype == np.float32 and arr.shape == (2, 2)
    arr[0, 0] = 99.0
    assert matrix[0] == [1.0, 2.0]


def test_matrix_refuses_data_that_does_not_fill_its_shape() -> None:
    with pytest.raises(ValueError, match="needs 6 values, got 5"):
        Matrix(2, 3, array("f", [0.0] * 5))


def test_numpy_query_vectors_take_the_buffer_path_and_match_the_list_path() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert convert.to_multi_vector(arr).data == convert.to_multi_vector(arr.tolist()).data


def test_non_float32_numpy_query_vectors_go_through_tolist() -> None:
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    message = convert.to_multi_vector(arr)
    assert (message.rows, message.dim) == (2, 3)
    assert convert.from_multi_vector(message).tolist() == arr.tolist()


def test_ragged_query_vectors_are_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="same length") as info:
        convert.to_multi_vector([[1.0, 2.0], [3.0]])
    assert info.value.field_violations[0].field == "query_vectors"


def test_empty_query_vectors_are_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="at least one row"):
        convert.to_multi_vector([])


def test_multivector_with_wrong_byte_count_is_an_internal_error() -> None:
    with pytest.raises(InternalError, match="expected 8"):
        convert.from_multi_vector(pb.MultiVector(rows=1, dim=2, data=b"\x00" * 7))


# --- requests ----------------------------------------------------------------------------------

def test_search_request_carries_every_knob() -> None:
    request = convert.search_request("docs", "cats", k=3, explain=True, nprobe=4, n_candidates=50,
                                     routing_key="user-1", query_vectors=[[1.0]],
                                     exhaustive=True, request_id="r1")
    assert (request.index, request.query, request.k, request.nprobe, request.n_candidates,
            request.explain, request.routing_key, request.exhaustive, request.request_id) == (
        "docs", "cats", 3, 4, 50, True, "user-1", True, "r1")
    assert request.query_vectors.rows == 1


def test_negative_k_is_rejected_before_sending_with_a_field_violation() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        convert.search_request("docs", "cats", k=-1)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field_violations == (FieldViolation("k", str(info.value.details)),)


def test_stream_query_dict_overrides_the_stream_defaults() -> None:
    request = convert.stream_search_request("docs", {"query": "dogs", "k": 2},
                                            {"k": 10, "explain": True}, "s-0")
    assert (request.query, request.k, request.explain, request.request_id) == ("dogs", 2, True,
                                                                               "s-0")


def test_stream_query_dict_with_an_unknown_key_names_the_allowed_ones() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown stream query keys \\['index'\\]"):
        convert.stream_search_request("docs", {"query": "x", "index": "other"}, {}, "s-0")


def test_encode_request_targets_the_index_or_the_encoder_never_both() -> None:
    assert convert.encode_query_request("docs", "q", None).WhichOneof("target") == "index"
    assert convert.encode_query_request(None, "q", "abc").WhichOneof("target") == "encoder_id"
    with pytest.raises(InvalidArgumentError, match="not both"):
        convert.encode_query_request("docs", "q", "abc")


def test_encode_documents_refuses_a_bare_string() -> None:
    with pytest.raises(InvalidArgumentError, match="not one string"):
        convert.encode_documents_request("docs", "one text", None)


# --- responses ---------------------------------------------------------------------------------

def test_search_response_becomes_hits_tagged_with_the_serving_version() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"title": "Cats", "page": 3, "score_hint": 0.5, "tags": ["a", "b"]})
    response = pb.SearchResponse(
        request_id="r1", index="docs", version="v2", encoder_id="enc",
        stats=pb.SearchStats(total_ms=1.5, candidates=7, query_tokens=4),
        hits=[pb.Hit(doc_id="d1", score=2.0, rank=1, metadata=metadata, explanation=[
            pb.TokenMatch(query_index=0, query_token="cat", doc_token_index=5, doc_token="cats",
                          start=10, end=14, similarity=0.75, share=0.375)])])
    result = convert.from_search_response(response)
    assert (result.index, result.version, result.encoder_id, result.request_id) == (
        "docs", "v2", "enc", "r1")
    (hit,) = result
    assert (hit.doc_id, hit.score, hit.rank, hit.version) == ("d1", 2.0, 1, "v2")
    assert hit.metadata == {"title": "Cats", "page": 3, "score_hint": 0.5, "tags": ["a", "b"]}
    assert isinstance(hit.metadata["page"], int)
    match = hit.explanation[0]
    assert (match.doc_token, match.start, match.end, match.share) == ("cats", 10, 14, 0.375)
    assert match.contribution == match.similarity == 0.75
    assert result.stats.candidates == 7


def test_search_response_without_an_echoed_id_keeps_the_sent_one() -> None:
    assert convert.from_search_response(pb.SearchResponse(), "sent").request_id == "sent"


def test_rollout_pointers_that_are_unset_become_none() -> None:
    info = convert.from_index_info(pb.IndexInfo(name="docs", rollout=pb.Rollout(
        index="docs", stable="v1", generation=4)))
    assert info.rollout is not None
    assert (info.rollout.stable, info.rollout.canary, info.rollout.previous_stable,
            info.rollout.generation) == ("v1", None, None, 4)
    assert convert.from_index_info(pb.IndexInfo(name="docs")).rollout is None


def test_version_state_from_a_newer_server_reads_as_unspecified() -> None:
    assert convert.from_version(pb.Version(state=pb.READY)).state is VersionState.READY
    assert convert.from_version_state(99) is VersionState.UNSPECIFIED


def test_a_filter_dict_survives_the_trip_to_protobuf_and_back() -> None:
    spec = {"lang": "en", "tags": ["a", 2.0, True], "year": {"gte": 2020.0, "lt": 2025.0},
            "draft": {"not": True}, "score": {"not": {"lte": 0.5}}}
    assert convert.from_filter(convert.to_filter(spec, ["d1", "d2"])) == (spec, ["d1", "d2"])


def test_every_colgrid_message_has_a_builder_or_a_converter() -> None:
    for name in pb.DESCRIPTOR.message_types_by_name:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
        if name.endswith("Request"):
            assert callable(getattr(convert, snake, None)), f"no builder for {name}"
        else:
            assert callable(getattr(convert, f"from_{snake}", None)), f"no converter for {name}"
    assert callable(convert.to_multi_vector)


# --- errors as values --------------------------------------------------------------------------

def test_errors_pickle_with_their_rich_details() -> None:
    error = NotFoundError("no index 'x'", request_id="r9",
                          resources=(ResourceInfo("index", "x"),), reason="NOT_FOUND")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is NotFoundError
    assert (copy.code, copy.request_id, copy.resource_info, copy.reason) == (
        grpc.StatusCode.NOT_FOUND, "r9", ResourceInfo("index", "x"), "NOT_FOUND")
    assert str(copy) == "NOT_FOUND: no index 'x' (request_id=r9)"


def test_root_error_defaults_to_unknown_code() -> None:
    assert ColgridError("boom").code == grpc.StatusCode.UNKNOWN
