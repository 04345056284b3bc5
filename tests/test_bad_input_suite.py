"""Bad input to every RPC, as one table: each case gets its documented status, with a message
that says what to change (and, for INVALID_ARGUMENT, the BadRequest field the server names).

After every case the server still answers a good search exactly as it did at module start, and
nothing stored changed: the registry as its own RPCs show it (indexes, versions with their
evaluations, rollouts, audit logs) and every file under the data dir (sha256, the registry's
SQLite files aside) are what they were before the case. A case that is documented to create
something (an ingest builds a version of its own scratch index, or records it FAILED) names that
index; everything else must still be untouched, and the scratch index holds exactly what the
case says.

Requests travel as raw bytes over a plain channel, so a case can send what no SDK would:
malformed protobuf, invalid UTF-8, a field of the wrong wire type.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from colgrid_client._pb import colgrid_pb2 as pb
from tests.conftest import LiveServer, start_live_server, stop_live_server
from tests.documents_gen import (
    chart_image, photo_image, png_bytes, png_header_only, write_encrypted_pdf, write_report_pdf, write_zero_page_pdf)

C = grpc.StatusCode
MESSAGE_LIMIT = 8 << 20  # the module server's max_message_bytes: small enough to exceed cheaply
GOOD_QUERY = "open a file"
DIM = 384  # the bundled MiniLM's
REGISTRY_FILES = ("registry.db", "registry.db-wal", "registry.db-shm", "registry.db-journal")


# --- the world the cases run against -------------------------------------------------------------

@dataclass(frozen=True)
class Env:
    """What a case may refer to: a known document, the multimodal encoder's id, real PDFs."""

    doc_id: str
    colqwen2_id: str
    report_pdf: bytes
    encrypted_pdf: bytes
    zero_page_pdf: bytes


@dataclass
class World:
    server: LiveServer
    channel: grpc.Channel
    env: Env
    baseline: list[tuple[str, float]]
    hashes: dict[tuple, str] = field(default_factory=dict)  # stat key -> sha256

    def good_search(self) -> list[tuple[str, float]]:
        answer = _unary(self.channel, "SearchService/Search", pb.SearchRequest(index="docs", query=GOOD_QUERY, k=10))
        assert answer.version == "v1"
        return [(h.doc_id, h.score) for h in answer.hits]

    def registry(self) -> dict[str, Any]:
        """Everything the registry RPCs show, per index (replica heartbeats aside)."""
        indexes = _unary(self.channel, "RegistryService/ListIndexes", pb.ListIndexesRequest()).indexes
        state: dict[str, Any] = {}
        for info in indexes:
            name = info.name
            versions = _unary(self.channel, "RegistryService/ListVersions", pb.ListVersionsRequest(index=name))
            rollout = _unary(self.channel, "RolloutService/GetRollout", pb.GetRolloutRequest(index=name)).rollout
            history = _unary(self.channel, "RolloutService/RolloutHistory",
                             pb.RolloutHistoryRequest(index=name, limit=1000))
            state[name] = (info.SerializeToString(deterministic=True),
                           versions.SerializeToString(deterministic=True),
                           rollout.SerializeToString(deterministic=True),
                           history.SerializeToString(deterministic=True))
        return state

    def files(self) -> dict[str, str]:
        """sha256 of every file under the data dir (links by their target, not followed); the
        registry's own files are compared through its RPCs instead. A file is re-read only when
        its stat changed: any write moves its ctime."""
        root = self.server.data_dir
        manifest: dict[str, str] = {}
        for folder, dirs, names in os.walk(root):
            for name in sorted(dirs + names):
                path = Path(folder) / name
                rel = str(path.relative_to(root))
                if path.is_symlink():
                    manifest[rel] = f"link:{os.readlink(path)}"
                elif name in names and rel not in REGISTRY_FILES:
                    st = path.stat()
                    key = (rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if key not in self.hashes:
                        self.hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()
                    manifest[rel] = self.hashes[key]
        return manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory, encoder_dir: Path, colqwen2_encoder_dir: Path) -> Iterator[World]:
    """A server of its own: `docs` (v1 stable, v2 FAILED, v3 BUILDING) and `empty` (no version),
    the bundled encoder linked in and a tiny ColQwen2 imported for image and PDF documents."""
    from colgrid_registry import open_registry
    from colgrid_server.builder import build_index, import_encoder
    from colgrid_server.corpus import iter_docstring_documents
    from colgrid_server.encoders import encoder_id
    from colgrid_server.paths import DataDir

    data = tmp_path_factory.mktemp("bad-input")
    (data / "encoders").mkdir()
    (data / "encoders" / encoder_dir.name).symlink_to(encoder_dir, target_is_directory=True)
    import_encoder(DataDir(data), colqwen2_encoder_dir)
    documents = list(iter_docstring_documents(limit=120, include_private=True))
    with open_registry(DataDir(data).registry_file) as registry:
        build_index(DataDir(data), registry, "docs", documents, progress=False)
        params = dict(encoder_id="0" * 64, encoder_kind="colbert", dim=DIM, storage_uri="", build_params={})
        failed = registry.allocate_version("docs", **params)
        registry.mark_failed("docs", failed.version, "a build that failed on purpose")
        registry.allocate_version("docs", **params)  # v3 stays BUILDING
        registry.ensure_index("empty")
    pdfs = tmp_path_factory.mktemp("bad-input-pdfs")
    report = write_report_pdf(pdfs / "report.pdf")
    env = Env(doc_id=documents[0].id, colqwen2_id=encoder_id(colqwen2_encoder_dir), report_pdf=report.read_bytes(),
              encrypted_pdf=write_encrypted_pdf(report, pdfs / "locked.pdf").read_bytes(),
              zero_page_pdf=write_zero_page_pdf(pdfs / "empty.pdf").read_bytes())
    server, thread = start_live_server(data, max_message_bytes=MESSAGE_LIMIT)
    channel = grpc.insecure_channel(server.target)
    try:
        world = World(server=server, channel=channel, env=env, baseline=[])
        world.baseline = world.good_search()
        assert len(world.baseline) == 10
        yield world
    finally:
        channel.close()
        stop_live_server(server, thread)


# --- sending anything ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    fields: tuple[str, ...]          # BadRequest field violations
    responses: tuple[Message, ...]   # what arrived before the status


def _method(rpc: str):
    service, name = rpc.split("/")
    return pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]


def _wire(item: Message | bytes) -> bytes:
    return item if isinstance(item, bytes) else item.SerializeToString()


def _unary(channel: grpc.Channel, rpc: str, request: Message) -> Any:
    method = _method(rpc)
    call = channel.unary_unary(f"/{method.full_name.rsplit('.', 1)[0]}/{method.name}",
                               request_serializer=None, response_deserializer=None)
    return getattr(pb, method.output_type.name).FromString(call(_wire(request), timeout=60))


def send(channel: grpc.Channel, rpc: str, payload: Message | bytes | Sequence[Message | bytes]) -> Outcome:
    """Any payload to any RPC as raw bytes; a client stream takes a sequence."""
    method = _method(rpc)
    path = f"/{method.full_name.rsplit('.', 1)[0]}/{method.name}"
    parse = getattr(pb, method.output_type.name).FromString
    shape = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    make = shape[(method.client_streaming, method.server_streaming)]
    call = make(path, request_serializer=None, response_deserializer=None)
    request = iter([_wire(p) for p in payload]) if method.client_streaming else _wire(payload)
    responses: list[Message] = []
    try:
        if method.server_streaming:
            for raw in call(request, timeout=120):
                responses.append(parse(raw))
        else:
            responses.append(parse(call(request, timeout=120)))
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", _violations(error), tuple(responses))
    return Outcome(C.OK, "", (), tuple(responses))


def _violations(error: grpc.RpcError) -> tuple[str, ...]:
    status = rpc_status.from_call(error)
    fields: list[str] = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return tuple(fields)


# --- the table ---------------------------------------------------------------------------------------

Payload = Message | bytes | Sequence[Message | bytes]


@dataclass(frozen=True)
class Case:
    id: str
    rpc: str                                     # "Service/Method"
    payload: Payload | Callable[[Env], Payload]
    code: grpc.StatusCode
    message: str = ""                            # a substring of the status message
    violation: str | None = None                 # the BadRequest field violation, where the server sets one
    creates: str | None = None                   # the scratch index the case may create (ingest)
    ready: bool = False                          # then: it holds one READY version, else FAILED ones at most
    errors: Mapping[str, str] = field(default_factory=dict)  # ingest: document -> IngestError code

    def request(self, env: Env) -> Payload:
        return self.payload(env) if callable(self.payload) else self.payload


def vectors(rows: int, dim: int, value: float = 0.1, *, data: bytes | None = None) -> pb.MultiVector:
    if data is None:
        data = np.full((rows, dim), value, dtype="<f4").tobytes()
    return pb.MultiVector(rows=rows, dim=dim, data=data)


def ingest(index: str, *documents: pb.IngestDocument | Message, good: bool = True, **options) -> list[pb.IngestRequest]:
    """Options, a good text document (so the stream has something to index), then `documents`."""
    first = [pb.IngestRequest(options=pb.IngestOptions(index=index, n_centroids=4, **options))]
    companion = [pb.IngestRequest(document=pb.IngestDocument(id="good", text="revenue by month"))] if good else []
    rest = [d if isinstance(d, pb.IngestRequest) else pb.IngestRequest(document=d) for d in documents]
    return first + companion + rest


def hostile_ingest(index: str, document: Callable[[Env], pb.IngestDocument]) -> Callable[[Env], Payload]:
    """One bad document next to a good one, through the multimodal encoder (it reads images and PDFs)."""
    return lambda env: ingest(index, document(env), encoder_id=env.colqwen2_id)


def judged(text: str = GOOD_QUERY, *, doc: str | None = None, relevance: float = 1.0, query_id: str = "q1",
           query_vectors: pb.MultiVector | None = None) -> Callable[[Env], pb.EvalQuery]:
    def make(env: Env) -> pb.EvalQuery:
        query = pb.EvalQuery(query_id=query_id, text=text,
                             judgements=[pb.Judgement(doc_id=doc or env.doc_id, relevance=relevance)])
        if query_vectors is not None:
            query.query_vectors.CopyFrom(query_vectors)
        return query
    return make


def evaluate(*queries: Callable[[Env], pb.EvalQuery], index: str = "docs",
             **fields) -> Callable[[Env], pb.EvaluateRequest]:
    return lambda env: pb.EvaluateRequest(index=index, queries=[q(env) for q in queries], **fields)


def search(**fields) -> pb.SearchRequest:
    return pb.SearchRequest(**{"index": "docs", "query": GOOD_QUERY, **fields})


def explain(**fields) -> Callable[[Env], pb.ExplainRequest]:
    return lambda env: pb.ExplainRequest(**{"index": "docs", "doc_id": env.doc_id, "query": GOOD_QUERY, **fields})


NAN, INF = float("nan"), float("inf")
NAMES_RULE = "use 1-63 characters"
# A SearchRequest cut inside its query string, and one whose query is not UTF-8.
SEARCH_BYTES = search(query="open a file please").SerializeToString()
TRUNCATED_SEARCH = SEARCH_BYTES[:-5]
BAD_UTF8_SEARCH = b"\x0a\x04docs\x12\x03\xff\xfe\xfd"
INDEX_AS_VARINT = b"\x08\x01\x12\x01q"  # field 1 (index, a string) sent as a varint
MALFORMED = b"\xff\xff\xff"


CASES: list[Case] = [
    # --- Search: text, names, knobs ------------------------------------------------------------------
    Case("search-empty-query", "SearchService/Search", search(query="   "), C.INVALID_ARGUMENT, "query is empty",
         "query"),
    Case("search-oversized-query", "SearchService/Search", search(query="word " * 1000), C.INVALID_ARGUMENT,
         "the limit is 4096", "query"),
    Case("search-control-characters-only", "SearchService/Search", search(query="\x00\x01\x02"),
         C.INVALID_ARGUMENT, "yields no tokens"),
    Case("search-missing-index", "SearchService/Search", search(index=""), C.INVALID_ARGUMENT,
         "index is required", "index"),
    Case("search-unknown-index", "SearchService/Search", search(index="no-such-index"), C.NOT_FOUND,
         "'no-such-index' does not exist"),
    Case("search-index-without-a-version", "SearchService/Search", search(index="empty"), C.FAILED_PRECONDITION,
         "no READY version"),
    Case("search-traversal-index", "SearchService/Search", search(index="../x"), C.INVALID_ARGUMENT,
         "path separators are not allowed", "index"),
    Case("search-slash-index", "SearchService/Search", search(index="a/b"), C.INVALID_ARGUMENT,
         "path separators are not allowed", "index"),
    Case("search-nul-in-index", "SearchService/Search", search(index="x\x00"), C.INVALID_ARGUMENT,
         "are not allowed", "index"),
    Case("search-300-char-unicode-index", "SearchService/Search", search(index="ä" * 300), C.INVALID_ARGUMENT,
         "300 characters long", "index"),
    Case("search-huge-k", "SearchService/Search", search(k=2**31 - 1), C.INVALID_ARGUMENT, "limit of 1000", "k"),
    Case("search-zero-k", "SearchService/Search", search(k=0), C.INVALID_ARGUMENT, "positive integer", "k"),
    Case("search-negative-nprobe", "SearchService/Search", search(nprobe=-1), C.INVALID_ARGUMENT,
         "positive integer", "nprobe"),
    Case("search-huge-nprobe", "SearchService/Search", search(nprobe=2**31 - 1), C.INVALID_ARGUMENT,
         "between 1 and 1024", "nprobe"),
    Case("search-negative-n-candidates", "SearchService/Search", search(n_candidates=-5), C.INVALID_ARGUMENT,
         "positive integer", "n_candidates"),
    Case("search-n-candidates-below-k", "SearchService/Search", search(k=50, n_candidates=10), C.INVALID_ARGUMENT,
         "at least k", "n_candidates"),
    # --- Search: query vectors -----------------------------------------------------------------------
    Case("search-vectors-of-the-wrong-dim", "SearchService/Search", search(query="", query_vectors=vectors(2, 10)),
         C.INVALID_ARGUMENT, "produces dim 384", "query_vectors.dim"),
    Case("search-nan-vectors", "SearchService/Search", search(query="", query_vectors=vectors(1, DIM, NAN)),
         C.INVALID_ARGUMENT, "NaN or infinite", "query_vectors.data"),
    Case("search-infinite-vectors", "SearchService/Search", search(query="", query_vectors=vectors(3, DIM, -INF)),
         C.INVALID_ARGUMENT, "NaN or infinite", "query_vectors.data"),
    Case("search-truncated-vector-bytes", "SearchService/Search",
         search(query="", query_vectors=vectors(2, DIM, data=b"\0" * 100)), C.INVALID_ARGUMENT, "rows*dim*4",
         "query_vectors.data"),
    Case("search-zero-rows", "SearchService/Search", search(query="", query_vectors=vectors(0, DIM, data=b"")),
         C.INVALID_ARGUMENT, "rows and dim must be positive", "query_vectors"),
    Case("search-rows-claiming-4-billion", "SearchService/Search",
         search(query="", query_vectors=vectors(2**32 - 1, DIM, data=b"\0" * 1536)), C.INVALID_ARGUMENT,
         "rows*dim*4", "query_vectors.data"),
    Case("search-text-and-vectors", "SearchService/Search", search(query_vectors=vectors(1, DIM)),
         C.INVALID_ARGUMENT, "not both", "query_vectors"),
    Case("search-over-the-message-limit", "SearchService/Search",
         lambda env: search(query="", query_vectors=vectors(MESSAGE_LIMIT // (4 * DIM) + 1, DIM)), C.RESOURCE_EXHAUSTED,
         "larger than max"),
    # --- Search: bytes that are not a valid SearchRequest ----------------------------------------------
    Case("search-malformed-protobuf", "SearchService/Search", MALFORMED, C.INVALID_ARGUMENT,
         "colgrid.v1.SearchRequest"),
    Case("search-truncated-protobuf", "SearchService/Search", TRUNCATED_SEARCH, C.INVALID_ARGUMENT,
         "colgrid.v1.SearchRequest"),
    Case("search-query-not-utf8", "SearchService/Search", BAD_UTF8_SEARCH, C.INVALID_ARGUMENT,
         "colgrid.v1.SearchRequest"),
    Case("search-index-of-the-wrong-wire-type", "SearchService/Search", INDEX_AS_VARINT, C.INVALID_ARGUMENT,
         "index is required", "index"),
    # --- SearchStream ------------------------------------------------------------------------------------
    Case("stream-bad-second-request", "SearchService/SearchStream", [search(), search(k=-1)], C.INVALID_ARGUMENT,
         "positive integer", "k"),
    Case("stream-unknown-index", "SearchService/SearchStream", [search(index="nope")], C.NOT_FOUND,
         "'nope' does not exist"),
    Case("stream-traversal-index", "SearchService/SearchStream", [search(index="../../etc")], C.INVALID_ARGUMENT,
         "path separators", "index"),
    Case("stream-nan-vectors", "SearchService/SearchStream", [search(query="", query_vectors=vectors(1, DIM, NAN))],
         C.INVALID_ARGUMENT, "NaN", "query_vectors.data"),
    Case("stream-malformed-protobuf", "SearchService/SearchStream", [SEARCH_BYTES, MALFORMED], C.INVALID_ARGUMENT,
         "colgrid.v1.SearchRequest"),
    # --- Explain -----------------------------------------------------------------------------------------
    Case("explain-missing-doc-id", "SearchService/Explain", explain(doc_id=""), C.INVALID_ARGUMENT,
         "doc_id is required", "doc_id"),
    Case("explain-unknown-doc", "SearchService/Explain", explain(doc_id="../no/such/doc"), C.NOT_FOUND,
         "is not in docs/v1"),
    Case("explain-query-token-out-of-range", "SearchService/Explain", explain(query_token=500), C.INVALID_ARGUMENT,
         "out of range", "query_token"),
    Case("explain-negative-query-token", "SearchService/Explain", explain(query_token=-1), C.INVALID_ARGUMENT,
         "0 or more", "query_token"),
    Case("explain-alpha-above-one", "SearchService/Explain", explain(alpha=5.0), C.INVALID_ARGUMENT,
         "between 0 and 1"),
    Case("explain-nan-alpha", "SearchService/Explain", explain(alpha=NAN), C.INVALID_ARGUMENT, "between 0 and 1"),
    Case("explain-traversal-version", "SearchService/Explain", explain(version="../v1"), C.INVALID_ARGUMENT,
         "invalid version name", "version"),
    Case("explain-failed-version", "SearchService/Explain", explain(version="v2"), C.FAILED_PRECONDITION,
         "not loaded on this server"),
    Case("explain-vectors-of-the-wrong-dim", "SearchService/Explain", explain(query="", query_vectors=vectors(1, 7)),
         C.INVALID_ARGUMENT, "produces dim 384", "query_vectors.dim"),
    Case("explain-malformed-protobuf", "SearchService/Explain", MALFORMED, C.INVALID_ARGUMENT,
         "colgrid.v1.ExplainRequest"),
    # --- EncodeQuery / EncodeDocuments -----------------------------------------------------------------
    Case("encode-query-without-a-target", "EncodeService/EncodeQuery", pb.EncodeQueryRequest(text="hello"),
         C.INVALID_ARGUMENT, "name a target", "target"),
    Case("encode-query-empty-text", "EncodeService/EncodeQuery", pb.EncodeQueryRequest(index="docs", text=" "),
         C.INVALID_ARGUMENT, "is empty"),
    Case("encode-query-oversized-text", "EncodeService/EncodeQuery",
         pb.EncodeQueryRequest(index="docs", text="w " * 5000), C.INVALID_ARGUMENT, "the limit is 4096", "text"),
    Case("encode-query-unknown-encoder", "EncodeService/EncodeQuery",
         pb.EncodeQueryRequest(encoder_id="0" * 64, text="hello"), C.NOT_FOUND, "encoder"),
    Case("encode-query-traversal-encoder", "EncodeService/EncodeQuery",
         pb.EncodeQueryRequest(encoder_id="../../etc/passwd", text="hello"), C.NOT_FOUND, "encoder"),
    Case("encode-query-index-without-a-version", "EncodeService/EncodeQuery",
         pb.EncodeQueryRequest(index="empty", text="hello"), C.FAILED_PRECONDITION, "no READY version"),
    Case("encode-documents-none", "EncodeService/EncodeDocuments", pb.EncodeDocumentsRequest(index="docs"),
         C.INVALID_ARGUMENT, "send at least one text", "texts"),
    Case("encode-documents-blank-text", "EncodeService/EncodeDocuments",
         pb.EncodeDocumentsRequest(index="docs", texts=["fine", " \n"]), C.INVALID_ARGUMENT, "texts[1] is empty",
         "texts[1]"),
    Case("encode-documents-too-many", "EncodeService/EncodeDocuments",
         pb.EncodeDocumentsRequest(index="docs", texts=["text"] * 300), C.RESOURCE_EXHAUSTED, "split the request"),
    Case("encode-documents-huge-text", "EncodeService/EncodeDocuments",
         pb.EncodeDocumentsRequest(index="docs", texts=["w " * 150_000]), C.INVALID_ARGUMENT, "the limit is",
         "texts[0]"),
    # --- Registry reads --------------------------------------------------------------------------------
    Case("list-indexes-malformed-protobuf", "RegistryService/ListIndexes", MALFORMED, C.INVALID_ARGUMENT,
         "colgrid.v1.ListIndexesRequest"),
    Case("list-indexes-ignores-unknown-fields", "RegistryService/ListIndexes", b"\x08\x01\x12\x03abc", C.OK),
    Case("get-index-unknown", "RegistryService/GetIndex", pb.GetIndexRequest(index="nope"), C.NOT_FOUND,
         "'nope' does not exist"),
    Case("get-index-traversal", "RegistryService/GetIndex", pb.GetIndexRequest(index="../docs"),
         C.INVALID_ARGUMENT, NAMES_RULE, "index"),
    Case("get-index-empty-name", "RegistryService/GetIndex", pb.GetIndexRequest(), C.INVALID_ARGUMENT,
         "index is required", "index"),
    Case("list-versions-unknown-index", "RegistryService/ListVersions", pb.ListVersionsRequest(index="nope"),
         C.NOT_FOUND, "'nope' does not exist"),
    Case("list-versions-uppercase-index", "RegistryService/ListVersions", pb.ListVersionsRequest(index="Docs"),
         C.INVALID_ARGUMENT, "uppercase letters", "index"),
    Case("get-version-unknown", "RegistryService/GetVersion", pb.GetVersionRequest(index="docs", version="v999"),
         C.NOT_FOUND, "no version 'v999'"),
    Case("get-version-empty-version", "RegistryService/GetVersion", pb.GetVersionRequest(index="docs"),
         C.INVALID_ARGUMENT, "version is required", "version"),
    Case("get-version-traversal", "RegistryService/GetVersion",
         pb.GetVersionRequest(index="docs", version="../../registry.db"), C.INVALID_ARGUMENT, NAMES_RULE, "version"),
    # --- Rollouts ------------------------------------------------------------------------------------------
    Case("get-rollout-unknown-index", "RolloutService/GetRollout", pb.GetRolloutRequest(index="nope"),
         C.NOT_FOUND, "'nope' does not exist"),
    Case("start-canary-unknown-version", "RolloutService/StartCanary",
         pb.StartCanaryRequest(index="docs", version="v9", percent=10), C.NOT_FOUND, "no version 'v9'"),
    Case("start-canary-failed-version", "RolloutService/StartCanary",
         pb.StartCanaryRequest(index="docs", version="v2", percent=10), C.FAILED_PRECONDITION, "not READY"),
    Case("start-canary-building-version", "RolloutService/StartCanary",
         pb.StartCanaryRequest(index="docs", version="v3", percent=10), C.FAILED_PRECONDITION, "not READY"),
    Case("start-canary-of-the-stable-version", "RolloutService/StartCanary",
         pb.StartCanaryRequest(index="docs", version="v1", percent=10), C.FAILED_PRECONDITION,
         "already the stable version"),
    Case("start-canary-over-100-percent", "RolloutService/StartCanary",
         pb.StartCanaryRequest(index="docs", version="v1", percent=150), C.INVALID_ARGUMENT, "from 0 to 100"),
    Case("start-canary-missing-version", "RolloutService/StartCanary", pb.StartCanaryRequest(index="docs"),
         C.INVALID_ARGUMENT, "version is required", "version"),
    Case("set-canary-percent-without-a-canary", "RolloutService/SetCanaryPercent",
         pb.SetCanaryPercentRequest(index="docs", percent=20), C.FAILED_PRECONDITION, "start one first"),
    Case("set-shadow-failed-version", "RolloutService/SetShadow", pb.SetShadowRequest(index="docs", version="v2"),
         C.FAILED_PRECONDITION, "not READY"),
    Case("set-shadow-over-100-percent", "RolloutService/SetShadow",
         pb.SetShadowRequest(index="docs", version="v1", percent=200), C.INVALID_ARGUMENT, "from 0 to 100"),
    Case("clear-shadow-without-a-shadow", "RolloutService/ClearShadow", pb.ClearShadowRequest(index="docs"),
         C.FAILED_PRECONDITION, "has none"),
    Case("promote-without-a-canary", "RolloutService/Promote", pb.PromoteRequest(index="docs"),
         C.FAILED_PRECONDITION, "no canary"),
    Case("promote-with-a-nan-policy", "RolloutService/Promote",
         pb.PromoteRequest(index="docs", policy=pb.PromotePolicy(max_ndcg_drop=NAN)), C.INVALID_ARGUMENT,
         "max_ndcg_drop"),
    Case("rollback-without-a-previous-stable", "RolloutService/Rollback", pb.RollbackRequest(index="docs"),
         C.FAILED_PRECONDITION, "no previous stable"),
    Case("abort-canary-without-a-canary", "RolloutService/AbortCanary", pb.AbortCanaryRequest(index="docs"),
         C.FAILED_PRECONDITION, "no canary"),
    Case("set-stable-unknown-version", "RolloutService/SetStable", pb.SetStableRequest(index="docs", version="v9"),
         C.NOT_FOUND, "no version 'v9'"),
    Case("set-stable-failed-version", "RolloutService/SetStable", pb.SetStableRequest(index="docs", version="v2"),
         C.FAILED_PRECONDITION, "not READY"),
    Case("set-stable-traversal-version", "RolloutService/SetStable",
         pb.SetStableRequest(index="docs", version="../empty/v1"), C.INVALID_ARGUMENT, NAMES_RULE, "version"),
    Case("set-stable-on-a-stale-generation", "RolloutService/SetStable",
         pb.SetStableRequest(index="docs", version="v1", expected_generation=999), C.ABORTED, "re-read the rollout"),
    Case("set-stable-negative-wait", "RolloutService/SetStable",
         pb.SetStableRequest(index="docs", version="v1", wait_for_replicas_s=-1), C.INVALID_ARGUMENT,
         "between 0 and 600", "wait_for_replicas_s"),
    Case("set-stable-nan-wait", "RolloutService/SetStable",
         pb.SetStableRequest(index="docs", version="v1", wait_for_replicas_s=NAN), C.INVALID_ARGUMENT,
         "between 0 and 600", "wait_for_replicas_s"),
    Case("set-stable-malformed-protobuf", "RolloutService/SetStable", MALFORMED, C.INVALID_ARGUMENT,
         "colgrid.v1.SetStableRequest"),
    Case("rollout-history-huge-limit", "RolloutService/RolloutHistory",
         pb.RolloutHistoryRequest(index="docs", limit=10**9), C.INVALID_ARGUMENT, "exceeds 1000", "limit"),
    Case("rollout-history-nul-index", "RolloutService/RolloutHistory", pb.RolloutHistoryRequest(index="\x00"),
         C.INVALID_ARGUMENT, "starts with", "index"),
    # --- Evaluate -------------------------------------------------------------------------------------------
    Case("evaluate-no-queries", "EvaluationService/Evaluate", pb.EvaluateRequest(index="docs"), C.INVALID_ARGUMENT,
         "send at least one judged query", "queries"),
    Case("evaluate-three-versions", "EvaluationService/Evaluate", evaluate(judged(), versions=["v1", "v2", "v3"]),
         C.INVALID_ARGUMENT, "at most 2", "versions"),
    Case("evaluate-a-version-twice", "EvaluationService/Evaluate", evaluate(judged(), versions=["v1", "v1"]),
         C.INVALID_ARGUMENT, "named twice"),
    Case("evaluate-failed-version", "EvaluationService/Evaluate", evaluate(judged(), versions=["v2"]),
         C.FAILED_PRECONDITION, "not READY"),
    Case("evaluate-unknown-version", "EvaluationService/Evaluate", evaluate(judged(), versions=["v9"]),
         C.NOT_FOUND, "no version 'v9'"),
    Case("evaluate-index-without-a-version", "EvaluationService/Evaluate", evaluate(judged(), index="empty"),
         C.FAILED_PRECONDITION, "no stable version"),
    Case("evaluate-huge-k", "EvaluationService/Evaluate", evaluate(judged(), k=10**6), C.INVALID_ARGUMENT,
         "limit of 1000", "k"),
    Case("evaluate-negative-nprobe", "EvaluationService/Evaluate", evaluate(judged(), nprobe=-1),
         C.INVALID_ARGUMENT, "positive integer", "nprobe"),
    Case("evaluate-duplicate-query-ids", "EvaluationService/Evaluate", evaluate(judged(), judged("sort a list")),
         C.INVALID_ARGUMENT, "appears twice", "queries[1].query_id"),
    Case("evaluate-nan-relevance", "EvaluationService/Evaluate", evaluate(judged(relevance=NAN)),
         C.INVALID_ARGUMENT, "finite number"),
    Case("evaluate-nan-query-vectors", "EvaluationService/Evaluate",
         evaluate(judged("", query_vectors=vectors(1, DIM, NAN))), C.INVALID_ARGUMENT, "NaN",
         "queries[0].query_vectors.data"),
    Case("evaluate-query-vectors-of-the-wrong-dim", "EvaluationService/Evaluate",
         evaluate(judged("", query_vectors=vectors(1, 10))), C.INVALID_ARGUMENT, "produces dim 384"),
    Case("evaluate-recording-unknown-judgements", "EvaluationService/Evaluate",
         evaluate(judged(doc="no-such-doc"), record=True, query_set="bad"), C.INVALID_ARGUMENT,
         "document ids"),
    # --- Ingest: the stream's rules (refused before any work, or the build is recorded FAILED) ----------
    Case("ingest-empty-stream", "IngestService/Ingest", [], C.INVALID_ARGUMENT, "ended before its options",
         "options"),
    Case("ingest-document-before-options", "IngestService/Ingest",
         [pb.IngestRequest(document=pb.IngestDocument(id="a", text="hello"))], C.INVALID_ARGUMENT,
         "first message of an ingest stream must be options", "options"),
    Case("ingest-traversal-index", "IngestService/Ingest", ingest("../escape"), C.INVALID_ARGUMENT,
         "path separators", "options.index"),
    Case("ingest-unknown-codec", "IngestService/Ingest", ingest("scratch-codec", codec="zip"), C.INVALID_ARGUMENT,
         "not one of fp16", "options.codec"),
    Case("ingest-huge-pdf-dpi", "IngestService/Ingest", ingest("scratch-dpi", pdf_dpi=10**6), C.INVALID_ARGUMENT,
         "pdf_dpi must be 1..600", "options.pdf_dpi"),
    Case("ingest-huge-pool-factor", "IngestService/Ingest", ingest("scratch-pool", pool_factor=10**6),
         C.INVALID_ARGUMENT, "pool_factor must be", "options.pool_factor"),
    Case("ingest-external-vectors-with-an-encoder", "IngestService/Ingest",
         ingest("scratch-ext", external_vectors=True, encoder_id="0" * 64), C.INVALID_ARGUMENT,
         "exclude each other", "options.encoder_id"),
    Case("ingest-malformed-protobuf", "IngestService/Ingest", [MALFORMED], C.INVALID_ARGUMENT,
         "colgrid.v1.IngestRequest"),
    Case("ingest-unknown-encoder", "IngestService/Ingest", ingest("scratch-encoder", encoder_id="0" * 64),
         C.NOT_FOUND, "encoder"),  # resolved before the index is created: nothing is
    Case("ingest-options-twice", "IngestService/Ingest",
         ingest("scratch-twice", pb.IngestRequest(options=pb.IngestOptions(index="scratch-twice"))),
         C.INVALID_ARGUMENT, "send options once", "options", creates="scratch-twice"),
    Case("ingest-options-without-documents", "IngestService/Ingest", ingest("scratch-nothing", good=False),
         C.INVALID_ARGUMENT, "could be indexed", "documents", creates="scratch-nothing"),
    Case("ingest-vectors-without-external-vectors", "IngestService/Ingest",
         ingest("scratch-vectors", pb.IngestDocument(id="v", vectors=vectors(2, 8))), C.INVALID_ARGUMENT,
         "set options.external_vectors", "options.external_vectors", creates="scratch-vectors"),
    Case("ingest-external-vectors-changing-dim", "IngestService/Ingest",
         ingest("scratch-dims", pb.IngestDocument(id="a", vectors=vectors(2, 8)),
                pb.IngestDocument(id="b", vectors=vectors(2, 12)), good=False, external_vectors=True),
         C.INVALID_ARGUMENT, "dim 12", "documents[1].vectors.dim", creates="scratch-dims"),
    Case("ingest-external-nan-vectors", "IngestService/Ingest",
         ingest("scratch-nan", pb.IngestDocument(id="a", vectors=vectors(2, 8, NAN)), good=False,
                external_vectors=True), C.INVALID_ARGUMENT, "NaN", "documents[0].vectors.data",
         creates="scratch-nan"),
    Case("ingest-only-a-junk-image", "IngestService/Ingest",
         lambda env: ingest("scratch-junk", pb.IngestDocument(id="junk", image=b"junk"), good=False,
                            encoder_id=env.colqwen2_id), C.INVALID_ARGUMENT, "none of the 1 inputs",
         "documents", creates="scratch-junk", errors={"junk": "corrupt_image"}),
    # --- Ingest: hostile documents are refused one by one, the rest is indexed --------------------------
    Case("ingest-truncated-png", "IngestService/Ingest",
         hostile_ingest("scratch-png", lambda env: pb.IngestDocument(
             id="cut", image=png_bytes(photo_image(64, 48))[:3000], filename="cut.png")), C.OK,
         creates="scratch-png", ready=True, errors={"cut": "corrupt_image"}),
    Case("ingest-png-header-claiming-50000x50000", "IngestService/Ingest",
         hostile_ingest("scratch-bomb",
                        lambda env: pb.IngestDocument(id="bomb", image=png_header_only(50_000, 50_000))),
         C.OK, creates="scratch-bomb", ready=True, errors={"bomb": "image_too_large"}),
    Case("ingest-zero-page-pdf", "IngestService/Ingest",
         hostile_ingest("scratch-zero", lambda env: pb.IngestDocument(id="zero", pdf=env.zero_page_pdf)),
         C.OK, creates="scratch-zero", ready=True, errors={"zero": "pdf_empty"}),
    Case("ingest-encrypted-pdf", "IngestService/Ingest",
         hostile_ingest("scratch-locked", lambda env: pb.IngestDocument(id="locked", pdf=env.encrypted_pdf)),
         C.OK, creates="scratch-locked", ready=True, errors={"locked": "pdf_encrypted"}),
    Case("ingest-truncated-pdf", "IngestService/Ingest",
         hostile_ingest("scratch-cut-pdf", lambda env: pb.IngestDocument(
             id="half", pdf=env.report_pdf[: len(env.report_pdf) // 2])),
         C.OK, creates="scratch-cut-pdf", ready=True, errors={"half": "pdf_truncated"}),
    Case("ingest-png-sent-as-pdf", "IngestService/Ingest",
         hostile_ingest("scratch-not-pdf", lambda env: pb.IngestDocument(id="png", pdf=png_bytes(chart_image(32, 32)))),
         C.OK, creates="scratch-not-pdf", ready=True, errors={"png": "pdf_corrupt"}),
    Case("ingest-traversal-filename", "IngestService/Ingest",
         hostile_ingest("scratch-escape", lambda env: pb.IngestDocument(
             id="escape", image=b"\x89PNG\r\n\x1a\nnot really", filename="../../../escape.png")),
         C.OK, creates="scratch-escape", ready=True, errors={"escape": "corrupt_image"}),
    Case("ingest-empty-document-id", "IngestService/Ingest",
         ingest("scratch-no-id", pb.IngestDocument(id="", text="a document without an id")), C.OK,
         creates="scratch-no-id", ready=True, errors={"document 1": "invalid_document"}),
    Case("ingest-duplicate-document-id", "IngestService/Ingest",
         ingest("scratch-dup", pb.IngestDocument(id="good", text="the same id again")), C.OK,
         creates="scratch-dup", ready=True, errors={"good": "duplicate_id"}),
    Case("ingest-image-for-a-text-encoder", "IngestService/Ingest",
         ingest("scratch-text-only", pb.IngestDocument(id="chart", image=png_bytes(chart_image(32, 32)))), C.OK,
         creates="scratch-text-only", ready=True, errors={"chart": "unsupported_by_encoder"}),
]


# --- the tests -----------------------------------------------------------------------------------------

def test_the_table_covers_every_rpc_with_at_least_forty_cases() -> None:
    every = {f"{s.name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert every - {c.rpc for c in CASES} == set()
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    scratch = [c.creates for c in CASES if c.creates]
    assert len(set(scratch)) == len(scratch)  # each case inspects a scratch index of its own


def test_the_snapshots_cover_the_served_version_the_encoders_and_every_index(world: World) -> None:
    files = world.files()
    assert any(path.startswith("indexes/docs/v1/") for path in files)
    assert any(path.startswith("encoders/") and not digest.startswith("link:") for path, digest in files.items())
    assert not any(path.startswith("registry.db") for path in files)
    assert {"docs", "empty"} <= set(world.registry())


def _without(state: dict[str, Any], index: str | None) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != index}


def _files_without(files: dict[str, str], index: str | None) -> dict[str, str]:
    if index is None:
        return files
    prefix = f"indexes/{index}"
    return {k: v for k, v in files.items() if k != prefix and not k.startswith(prefix + "/")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_its_documented_status_and_changes_nothing(world: World, case: Case) -> None:
    registry_before, files_before = world.registry(), world.files()
    assert case.creates is None or case.creates not in registry_before

    outcome = send(world.channel, case.rpc, case.request(world.env))

    # First what must hold whatever the status: the server still serves, nothing else changed.
    assert world.good_search() == world.baseline
    registry_after = world.registry()
    assert _without(registry_after, case.creates) == registry_before
    assert _files_without(world.files(), case.creates) == files_before
    if case.creates is not None:
        assert case.creates in registry_after
        versions = _unary(world.channel, "RegistryService/ListVersions", pb.ListVersionsRequest(index=case.creates))
        states = [v.state for v in versions.versions]
        assert (states == [pb.READY]) if case.ready else (set(states) <= {pb.FAILED}), states

    assert (outcome.code, case.message in outcome.details) == (case.code, True), outcome.details
    if case.violation is not None:
        assert case.violation in outcome.fields, outcome.fields
    assert "ingest-spool" not in outcome.details  # the server's scratch files mean nothing to a caller
    if case.rpc == "IngestService/Ingest":
        _check_ingest(world, case, outcome)


def _check_ingest(world: World, case: Case, outcome: Outcome) -> None:
    """Per-document errors arrive in progress messages, told in the caller's terms; a stream that
    succeeds ends READY with the good document only."""
    errors = [e for p in outcome.responses for e in p.errors]
    assert {e.document: e.code for e in errors} == case.errors
    assert all("ingest-spool" not in e.message and str(world.server.data_dir) not in e.message for e in errors)
    spool = world.server.data_dir / "ingest-spool"
    assert not spool.exists() or list(spool.iterdir()) == []
    if case.code == C.OK:
        assert any(path.startswith(f"indexes/{case.creates}/") for path in world.files())  # what the manifest skips
        last = outcome.responses[-1]
        assert (last.stage, last.version.state, last.version.documents) == ("ready", pb.READY, 1)
        assert (last.received, last.encoded, last.failed) == (1 + len(case.errors), 1, len(case.errors))
