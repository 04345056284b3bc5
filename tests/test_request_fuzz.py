"""Property tests of request validation: whatever a caller sends (any unicode, any integer, any
bytes as vectors, any name), the answer is a result or a documented client error — never
INTERNAL or UNKNOWN — and the server keeps serving.

Two layers: the validation functions of `service.requests` called directly (many examples,
fast), then a smaller number of generated requests through a real server of this module's own,
whose rollout state the generated rollout changes are free to move.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.config import Settings
from colgrid_server.search import (
    CANDIDATES_PER_HIT, DEFAULT_K, DEFAULT_N_CANDIDATES, DEFAULT_NPROBE, MAX_K, MAX_N_CANDIDATES, MAX_NPROBE,
    SearchParams)
from colgrid_server.service import requests
from colgrid_server.service.status import status_code_for
from tests.conftest import LiveServer, start_live_server, stop_live_server

C = grpc.StatusCode
CLIENT_ERRORS = frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED,
                           C.OUT_OF_RANGE})
# Rollout changes are compare-and-set on a generation: a stale expected_generation is ABORTED.
ROLLOUT_OUTCOMES = CLIENT_ERRORS | {C.OK, C.ABORTED}
DIM = 384
SETTINGS = Settings()
DIRECT = settings(max_examples=300, deadline=None, database=None)
SERVED = settings(max_examples=30, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- strategies ----------------------------------------------------------------------------------
# Each field is usually valid and otherwise anything, so generated requests get past the first
# check often enough to reach the deeper ones (and the work behind them).

def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy, odds: int = 3) -> st.SearchStrategy:
    """`valid` odds times out of odds + 1, else `anything`."""
    return st.integers(0, odds).flatmap(lambda i: anything if i == 0 else valid)


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


INT32 = st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, -1, 10, 1000, 1001, 1024, 1025]))
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 50, 100, 101]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 5))
LONG_TEXT = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(4000, 5000))  # no lone surrogates: protobuf cannot hold them
WORDS = st.lists(st.sampled_from(["open", "a", "file", "sort", "list", "zlib", "ünïcödé", "日本語", "🙂"]),
                 min_size=1, max_size=8).map(" ".join)
TEXT = mostly(WORDS, st.one_of(st.text(max_size=60), LONG_TEXT,
                               st.sampled_from(["", " ", "\x00", "\x00\x01", "\u200b", "\n\t"])))
NAME = st.one_of(st.sampled_from(["docs", "empty", "", "nope", "../x", "a/b", "x\x00", "ä" * 300, "Docs", "v1",
                                  "v2", "v3", "v99"]),
                 st.from_regex(r"[a-z0-9][a-z0-9._-]{0,70}", fullmatch=True), st.text(max_size=80))
INDEX = mostly(st.just("docs"), NAME)
VERSION = mostly(st.sampled_from(["v1", "v2"]), st.one_of(st.sampled_from(["v3", "", "v0", "../v1"]), NAME))
KNOB = optional(mostly(st.integers(1, 300), INT32))
# Waits the server refuses, or short ones: a valid long wait only waits if a replica lags.
SECONDS = mostly(st.floats(0, 0.2), st.one_of(st.floats(max_value=-1e-300), st.floats(min_value=600.000001),
                                               st.just(float("nan"))))
FLOAT32 = st.floats(width=32)  # NaN, ±inf and ±3.4e38 included


@st.composite
def multivectors(draw, max_rows: int = 4) -> pb.MultiVector:
    """Usually a (rows, 384) matrix of any finite float32s (overflowing sums included); else
    shapes right and wrong (rows or dim 0, a dim off by one, counts near 2**32) with data of the
    right size (random bits, one value that may be NaN/inf) or of any size."""
    if draw(st.integers(0, 2)):
        rows = draw(st.integers(1, max_rows))
        values = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=8))
        data = np.resize(np.array(values, dtype="<f4"), rows * DIM).tobytes()
        return pb.MultiVector(rows=rows, dim=DIM, data=data)
    rows = draw(st.one_of(st.integers(0, max_rows), st.sampled_from([2**31, 2**32 - 1])))
    dim = draw(st.sampled_from([0, 1, DIM - 1, DIM, DIM + 1, 2**32 - 1]))
    size = rows * dim * 4
    if size <= max_rows * DIM * 4:
        data = draw(st.one_of(
            st.binary(min_size=size, max_size=size),
            FLOAT32.map(lambda v: np.full(rows * dim, v, dtype="<f4").tobytes()),
            st.binary(max_size=64)))
    else:
        data = draw(st.binary(max_size=64))
    return pb.MultiVector(rows=rows, dim=dim, data=data)


@st.composite
def search_requests(draw, index: st.SearchStrategy = INDEX) -> pb.SearchRequest:
    request = pb.SearchRequest(index=draw(index), explain=draw(st.booleans()),
                               routing_key=draw(st.text(max_size=20)), exhaustive=draw(st.booleans()))
    for knob in ("k", "nprobe", "n_candidates"):
        value = draw(KNOB)
        if value is not None:
            setattr(request, knob, value)
    vectors = draw(st.integers(0, 2)) == 0
    if vectors:
        request.query_vectors.CopyFrom(draw(multivectors()))
    request.query = draw(mostly(st.just(""), TEXT) if vectors else TEXT)
    return request


def _refused_as_a_client_error(exc: Exception) -> None:
    code = status_code_for(exc)
    assert code in CLIENT_ERRORS, f"{type(exc).__name__}: {exc} -> {code}"
    assert str(exc)  # a message to act on


# Oracles: what the API documents as valid, written out independently of the code under test.

def _knobs_valid(request: pb.SearchRequest) -> bool:
    k = request.k if request.HasField("k") else DEFAULT_K
    nprobe = request.nprobe if request.HasField("nprobe") else DEFAULT_NPROBE
    candidates = (request.n_candidates if request.HasField("n_candidates")
                  else max(DEFAULT_N_CANDIDATES, CANDIDATES_PER_HIT * k))
    return (1 <= k <= min(SETTINGS.max_k, MAX_K) and 1 <= nprobe <= MAX_NPROBE
            and k <= candidates <= MAX_N_CANDIDATES)


def _query_valid(request: pb.SearchRequest) -> bool:
    if not request.HasField("query_vectors"):
        return bool(request.query.strip()) and len(request.query) <= SETTINGS.max_query_chars
    mv = request.query_vectors
    if request.query.strip() or mv.rows == 0 or mv.dim != DIM or len(mv.data) != mv.rows * DIM * 4:
        return False
    return bool(np.isfinite(np.frombuffer(mv.data, dtype="<f4")).all())


# --- the validation functions, directly ----------------------------------------------------------------

@DIRECT
@given(request=search_requests())
def test_search_knobs_are_refused_exactly_when_invalid(request: pb.SearchRequest) -> None:
    try:
        params = requests.search_params(request, SETTINGS)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions
        _refused_as_a_client_error(exc)
        assert not _knobs_valid(request)
        return
    assert _knobs_valid(request)
    assert isinstance(params, SearchParams)
    for knob in ("k", "nprobe", "n_candidates"):
        if request.HasField(knob):
            assert getattr(params, knob) == getattr(request, knob)


@DIRECT
@given(request=search_requests())
def test_a_search_query_is_refused_exactly_when_invalid(request: pb.SearchRequest) -> None:
    try:
        query = requests.query(request, SETTINGS, dim=DIM)
    except Exception as exc:  # noqa: BLE001
        _refused_as_a_client_error(exc)
        assert not (_knobs_valid(request) and _query_valid(request))
        return
    assert _knobs_valid(request) and _query_valid(request)
    if request.HasField("query_vectors"):
        assert query.vectors is not None and query.vectors.dtype == np.float32
        assert query.vectors.shape == (request.query_vectors.rows, DIM)
        assert query.vectors.tobytes() == request.query_vectors.data
    else:
        assert query.text == request.query


@DIRECT
@given(texts=st.lists(TEXT, max_size=4) | st.lists(st.just("x"), min_size=250, max_size=300)
       | st.lists(st.builds(lambda n: "w" * n, st.integers(262_000, 263_000)), min_size=1, max_size=1))
def test_texts_to_encode_are_refused_exactly_when_invalid(texts: list[str]) -> None:
    valid = (1 <= len(texts) <= SETTINGS.max_encode_texts
             and all(t.strip() and len(t) <= SETTINGS.max_query_chars * 64 for t in texts))
    try:
        accepted = requests.encode_texts(texts, SETTINGS)
    except Exception as exc:  # noqa: BLE001
        _refused_as_a_client_error(exc)
        assert not valid
        return
    assert valid and accepted == texts


@DIRECT
@given(name=NAME)
def test_an_index_name_is_refused_exactly_when_empty(name: str) -> None:
    try:
        accepted = requests.index_name(name)
    except Exception as exc:  # noqa: BLE001
        _refused_as_a_client_error(exc)
        assert name == ""
        return
    assert accepted == name != ""  # its form is the registry's to check (see the served tests)


# --- through a real server ---------------------------------------------------------------------------

TOPICS = ["open a file and read its lines", "sort a list in place", "parse a date from a string",
          "join paths on any platform", "compress bytes with zlib", "send an HTTP request",
          "match a regular expression", "spawn a subprocess and wait", "format a float with commas",
          "walk a directory tree", "hash a password with a salt", "decode JSON into a dict"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, shared_data_dir: Path, encoder_dir: Path) -> Iterator[LiveServer]:
    """`docs` with two READY versions (v1 stable, v2 not routed) and `empty` with none."""
    from colgrid_registry import open_registry
    from colgrid_server.builder import build_index
    from colgrid_server.documents import Document
    from colgrid_server.paths import DataDir
    from tests.conftest import link_encoders

    data = tmp_path_factory.mktemp("fuzz")
    link_encoders(data, shared_data_dir)
    first = [Document(f"a{i}", text) for i, text in enumerate(TOPICS)]
    second = [Document(f"b{i}", f"{text}, second edition") for i, text in enumerate(TOPICS)]
    with open_registry(DataDir(data).registry_file) as registry:
        build_index(DataDir(data), registry, "docs", first, progress=False)
        build_index(DataDir(data), registry, "docs", second, activate=False, progress=False)
        registry.ensure_index("empty")
    server, thread = start_live_server(data)
    yield server
    stop_live_server(server, thread)


@pytest.fixture(scope="module")
def channel(fuzz_server: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target) as channel:
        yield channel


def _outcome(call, request) -> C:
    try:
        call(request, timeout=60)
    except grpc.RpcError as error:
        assert error.details(), error.code()
        code = error.code()
    else:
        code = C.OK
    event(f"status {code.name}")  # the spread of outcomes shows with --hypothesis-show-statistics
    return code


def _still_serving(channel: grpc.Channel) -> None:
    answer = pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(index="docs", query="sort a list", k=3),
                                                       timeout=60)
    assert len(answer.hits) == 3 and answer.version in ("v1", "v2")


@SERVED
@given(request=search_requests())
def test_any_search_is_answered_or_refused_as_a_client_error(channel: grpc.Channel,
                                                             request: pb.SearchRequest) -> None:
    assert _outcome(pb_grpc.SearchServiceStub(channel).Search, request) in CLIENT_ERRORS | {C.OK}
    _still_serving(channel)


@SERVED
@given(index=INDEX, doc_id=mostly(st.sampled_from(["a0", "a3", "b1"]), st.text(max_size=30)),
       query=TEXT, version=mostly(st.just(""), VERSION), token=optional(mostly(st.integers(0, 3), INT32)),
       alpha=mostly(st.floats(0, 1), FLOAT32), render=st.booleans(), vectors=mostly(st.none(), multivectors()))
def test_any_explain_is_answered_or_refused_as_a_client_error(channel: grpc.Channel, index, doc_id, query, version,
                                                              token, alpha, render, vectors) -> None:
    request = pb.ExplainRequest(index=index, doc_id=doc_id, query="" if vectors else query, version=version,
                                alpha=alpha, render=render)
    if token is not None:
        request.query_token = token
    if vectors is not None:
        request.query_vectors.CopyFrom(vectors)
    assert _outcome(pb_grpc.SearchServiceStub(channel).Explain, request) in CLIENT_ERRORS | {C.OK}
    _still_serving(channel)


@SERVED
@given(target=mostly(st.just("index"), st.sampled_from(["encoder_id", None])), name=INDEX, text=TEXT)
def test_any_query_encoding_is_answered_or_refused_as_a_client_error(channel: grpc.Channel, target, name,
                                                                     text) -> None:
    request = pb.EncodeQueryRequest(text=text, **({target: name} if target else {}))
    assert _outcome(pb_grpc.EncodeServiceStub(channel).EncodeQuery, request) in CLIENT_ERRORS | {C.OK}
    _still_serving(channel)


ROLLOUT_CHANGES = {
    "StartCanary": pb.StartCanaryRequest, "SetCanaryPercent": pb.SetCanaryPercentRequest,
    "SetShadow": pb.SetShadowRequest, "ClearShadow": pb.ClearShadowRequest, "Promote": pb.PromoteRequest,
    "Rollback": pb.RollbackRequest, "AbortCanary": pb.AbortCanaryRequest, "SetStable": pb.SetStableRequest,
}


@st.composite
def rollout_changes(draw) -> tuple[str, object]:
    """Any change with any fields its message has; mostly on `docs`, so the changes really move it."""
    name = draw(st.sampled_from(sorted(ROLLOUT_CHANGES)))
    kind = ROLLOUT_CHANGES[name]
    request = kind(index=draw(INDEX), actor=draw(st.text(max_size=20)), reason=draw(st.text(max_size=20)))
    fields = kind.DESCRIPTOR.fields_by_name
    if "version" in fields:
        request.version = draw(VERSION)
    if "percent" in fields and draw(st.booleans()):
        request.percent = draw(mostly(st.integers(0, 100), UINT32))
    if draw(st.integers(0, 3)) == 0:
        request.expected_generation = draw(UINT64)
    if draw(st.integers(0, 3)) == 0:
        request.wait_for_replicas_s = draw(SECONDS)
    if name == "Promote" and draw(st.booleans()):
        for rule, value in (("max_ndcg_drop", st.floats()), ("min_shadow_overlap", st.floats()),
                            ("min_shadow_compared", UINT64)):
            if draw(st.booleans()):
                setattr(request.policy, rule, draw(value))
    return name, request


@SERVED
@given(change=rollout_changes())
def test_any_rollout_change_is_applied_or_refused_as_a_client_error(channel: grpc.Channel, change) -> None:
    name, request = change
    stub = pb_grpc.RolloutServiceStub(channel)
    assert _outcome(getattr(stub, name), request) in ROLLOUT_OUTCOMES
    stable = stub.GetRollout(pb.GetRolloutRequest(index="docs"), timeout=60).rollout.stable
    assert stable in ("v1", "v2")  # only READY versions are ever routed
    _still_serving(channel)


@SERVED
@given(index=INDEX, limit=UINT32)
def test_any_rollout_history_is_answered_or_refused_as_a_client_error(channel: grpc.Channel, index, limit) -> None:
    request = pb.RolloutHistoryRequest(index=index, limit=limit)
    assert _outcome(pb_grpc.RolloutServiceStub(channel).RolloutHistory, request) in CLIENT_ERRORS | {C.OK}
