"""The one boundary between colgrid.v1 protobuf messages and the SDK's dataclasses.

Request builders are named after the message (`search_request`); converters from the wire are
`from_<message>`. No other module reads or builds a colgrid_pb2 message.
"""
from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from colgrid_client._errors import FieldViolation, InternalError, InvalidArgumentError
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._types import (
    AuditEntry, Hit, IndexInfo, LoadError, Matrix, ReplicaAck, Rollout, RolloutStatus, SearchResult,
    PatchRef, SearchStats, ServingVersion, ShadowStats, TokenMatch, Version, VersionState,
)
from colgrid_client._types import EvalQuery, PromotePolicy, VersionEvaluation
from colgrid_client._types import IngestDoc, IngestError, IngestOptions, IngestProgress
from colgrid_client._types import Explanation

_LITTLE_ENDIAN = sys.byteorder == "little"
_UINT32_MAX = 2**32 - 1
# Search knobs a stream query given as a dict may set (the index is fixed for the stream).
STREAM_QUERY_KEYS = frozenset({"query", "query_vectors", "k", "explain", "nprobe", "n_candidates",
                               "routing_key", "exhaustive", "request_id", "filter", "doc_ids"})
RANGE_KEYS = ("gte", "gt", "lte", "lt")


def invalid(field: str, message: str) -> InvalidArgumentError:
    """A client-side validation error shaped like the server's (with a field violation)."""
    return InvalidArgumentError(message, field_violations=(FieldViolation(field, message),))


# ---------------------------------------------------------------------------------------------
# Multi-vectors
# ---------------------------------------------------------------------------------------------

def to_multi_vector(value: Any) -> pb.MultiVector:
    """A MultiVector from a Matrix, a list of equal-length rows, or anything with `.tolist()`.

    A C-contiguous 2-D float32 buffer (a numpy array) is copied as bytes without numpy.
    """
    buffer = None if isinstance(value, Matrix) else _float32_buffer(value)
    if buffer is not None:
        message = pb.MultiVector(rows=buffer.shape[0], dim=buffer.shape[1], data=buffer.tobytes())
    else:
        try:
            matrix = Matrix.from_rows(value)
        except (TypeError, ValueError) as exc:
            raise invalid("query_vectors", f"query_vectors must be a 2-D matrix of floats: {exc}"
                          ) from exc
        values = matrix.data
        if not _LITTLE_ENDIAN:
            values = array("f", values)
            values.byteswap()
        message = pb.MultiVector(rows=matrix.rows, dim=matrix.dim, data=values.tobytes(),
                                 tokens=matrix.tokens)
        if matrix.spans:
            message.span_starts.extend(-1 if s is None else s[0] for s in matrix.spans)
            message.span_ends.extend(-1 if s is None else s[1] for s in matrix.spans)
    if message.rows == 0 or message.dim == 0:
        raise invalid("query_vectors", f"query_vectors must have at least one row and one "
                                       f"column, got shape ({message.rows}, {message.dim})")
    return message


def _float32_buffer(value: Any) -> memoryview | None:
    try:
        view = memoryview(value)
    except TypeError:
        return None
    if view.format != "f" or view.ndim != 2 or not view.c_contiguous or not _LITTLE_ENDIAN:
        return None
    return view


def from_multi_vector(message: pb.MultiVector) -> Matrix:
    rows, dim = message.rows, message.dim
    if len(message.data) != rows * dim * 4:
        raise InternalError(f"server sent a ({rows} x {dim}) multi-vector with "
                            f"{len(message.data)} bytes; expected {rows * dim * 4}")
    data = array("f")
    data.frombytes(message.data)
    if not _LITTLE_ENDIAN:
        data.byteswap()
    if len(message.span_starts) != len(message.span_ends):
        raise InternalError(f"server sent {len(message.span_starts)} span starts but "
                            f"{len(message.span_ends)} span ends")
    spans = tuple(None if start < 0 else (start, end)
                  for start, end in zip(message.span_starts, message.span_ends))
    try:
        return Matrix(rows, dim, data, tuple(message.tokens), spans)
    except ValueError as exc:
        raise InternalError(f"server sent an inconsistent multi-vector: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

def search_request(index: str, query: str = "", *, k: int = 10, explain: bool = False,
                   nprobe: int = 0, n_candidates: int = 0, routing_key: str = "",
                   query_vectors: Any = None, exhaustive: bool = False,
                   request_id: str = "", filter: Mapping[str, Any] | None = None,  # noqa: A002 - the API's word
                   doc_ids: Sequence[str] | None = None) -> pb.SearchRequest:
    # The knobs are proto3 `optional`: 0 here means "server default", so leave them unset.
    # None is accepted as "default" too, for callers forwarding optional settings.
    knobs = {name: value for name, value in (("k", _uint("k", k or 0)), ("nprobe", _uint("nprobe", nprobe or 0)),
                                             ("n_candidates", _uint("n_candidates", n_candidates or 0)))
             if value}
    request = pb.SearchRequest(
        index=_text("index", index), query=_text("query", query), **knobs,
        explain=bool(explain), request_id=_text("request_id", request_id),
        routing_key=_text("routing_key", routing_key), exhaustive=bool(exhaustive))
    if query_vectors is not None:
        request.query_vectors.CopyFrom(to_multi_vector(query_vectors))
    if filter or doc_ids:
        request.filter.CopyFrom(to_filter(filter or {}, doc_ids or ()))
    return request


def to_filter(spec: Mapping[str, Any], doc_ids: Sequence[str] = ()) -> pb.Filter:
    """{"field": value | [values] | {"gte": .., "lt": ..} | {"not": value | [values] | range}}
    (all must hold; dots reach nested metadata) and document ids, as a pb.Filter."""
    if not isinstance(spec, Mapping):
        raise invalid("filter", f"filter must be a dict of metadata fields, got {type(spec).__name__}")
    if isinstance(doc_ids, str) or not all(isinstance(d, str) for d in doc_ids):
        raise invalid("doc_ids", "doc_ids must be a list of document id strings")
    out = pb.Filter(doc_ids=list(doc_ids))
    for field, condition in spec.items():
        negate = isinstance(condition, Mapping) and set(condition) == {"not"}
        if negate:
            condition = condition["not"]
        c = out.must.add(field=_text("filter", field), negate=negate)
        if isinstance(condition, Mapping):
            unknown = set(condition) - set(RANGE_KEYS)
            if unknown:
                raise invalid("filter", f"filter field {field!r}: unknown keys {sorted(unknown)}; "
                                        f"use {', '.join(RANGE_KEYS)} or not")
            for name, bound in condition.items():
                if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                    raise invalid("filter", f"filter field {field!r}: {name} must be a number, got {bound!r}")
                setattr(c, name, float(bound))
            continue
        for value in condition if isinstance(condition, (list, tuple)) else [condition]:
            if isinstance(value, bool):
                c.any_of.add(bool_value=value)
            elif isinstance(value, (int, float)):
                c.any_of.add(number_value=float(value))
            elif isinstance(value, str):
                c.any_of.add(string_value=value)
            else:
                raise invalid("filter", f"filter field {field!r}: {value!r} is not a string, number or boolean")
    return out


def from_field_condition(c: pb.FieldCondition) -> tuple[str, Any]:
    """(field, its form in a `filter` dict): the inverse of what to_filter sends."""
    if c.any_of:
        values = [getattr(v, v.WhichOneof("kind")) if v.WhichOneof("kind") else None for v in c.any_of]
        spec: Any = values[0] if len(values) == 1 else values
    else:
        spec = {name: getattr(c, name) for name in RANGE_KEYS if c.HasField(name)}
    return c.field, {"not": spec} if c.negate else spec


def from_filter(f: pb.Filter) -> tuple[dict[str, Any], list[str]]:
    """(filter dict, doc_ids) of a pb.Filter (a field named twice keeps its last condition)."""
    return dict(from_field_condition(c) for c in f.must), list(f.doc_ids)


def stream_search_request(index: str, query: str | Mapping[str, Any], defaults: Mapping[str, Any],
                          request_id: str) -> pb.SearchRequest:
    """One stream request: a query string, or a dict overriding the stream's search knobs."""
    if isinstance(query, str):
        return search_request(index, query, **{**defaults, "request_id": request_id})
    if not isinstance(query, Mapping):
        raise invalid("queries", f"each stream query must be a str or a dict, "
                                 f"got {type(query).__name__}")
    unknown = set(query) - STREAM_QUERY_KEYS
    if unknown:
        raise invalid("queries", f"unknown stream query keys {sorted(unknown)}; "
                                 f"allowed: {sorted(STREAM_QUERY_KEYS)}")
    return search_request(index, **{**defaults, **query, "request_id": request_id})


def explain_request(index: str, doc_id: str, query: str = "", *, query_token: int | None = None,
                    render: bool = False, version: str | None = None, alpha: float = 0.5,
                    routing_key: str = "", query_vectors: Any = None) -> pb.ExplainRequest:
    """alpha travels as given (the server refuses one outside [0, 1]); 0 on the wire means the
    server default 0.5."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise invalid("alpha", f"alpha must be a number between 0 and 1, got {alpha!r}")
    request = pb.ExplainRequest(index=_text("index", index), doc_id=_text("doc_id", doc_id),
                                query=_text("query", query), version=_text("version", version or ""),
                                render=bool(render), routing_key=_text("routing_key", routing_key),
                                alpha=float(alpha))
    if query_token is not None:
        if isinstance(query_token, bool) or not isinstance(query_token, int) or not -2**31 <= query_token < 2**31:
            raise invalid("query_token", f"query_token must be a query token position (int), got {query_token!r}")
        request.query_token = query_token
    if query_vectors is not None:
        request.query_vectors.CopyFrom(to_multi_vector(query_vectors))
    return request


def encode_query_request(index: str | None, text: str, encoder_id: str | None
                         ) -> pb.EncodeQueryRequest:
    request = pb.EncodeQueryRequest(text=_text("text", text))
    _set_target(request, index, encoder_id)
    return request


def encode_documents_request(index: str | None, texts: Iterable[str], encoder_id: str | None
                             ) -> pb.EncodeDocumentsRequest:
    if isinstance(texts, str):
        raise invalid("texts", "texts must be a list of strings, not one string")
    request = pb.EncodeDocumentsRequest(texts=[_text("texts", t) for t in texts])
    _set_target(request, index, encoder_id)
    return request


def _set_target(request: pb.EncodeQueryRequest | pb.EncodeDocumentsRequest,
                index: str | None, encoder_id: str | None) -> None:
    if index and encoder_id:
        raise invalid("encoder_id", "give an index or an encoder_id, not both")
    if encoder_id:
        request.encoder_id = _text("encoder_id", encoder_id)
    elif index:
        request.index = _text("index", index)
    else:
        raise invalid("index", "an index (or an encoder_id) is required")


def list_indexes_request() -> pb.ListIndexesRequest:
    return pb.ListIndexesRequest()


def get_index_request(index: str) -> pb.GetIndexRequest:
    return pb.GetIndexRequest(index=_text("index", index))


def list_versions_request(index: str) -> pb.ListVersionsRequest:
    return pb.ListVersionsRequest(index=_text("index", index))


def get_version_request(index: str, version: str) -> pb.GetVersionRequest:
    return pb.GetVersionRequest(index=_text("index", index), version=_text("version", version))


# --- rollout requests: the change fields (10-13) are the same on every change ------------------

def _change_fields(expected_generation: Any = None, actor: Any = "", reason: Any = "",
                   wait_for_replicas: Any = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"actor": _text("actor", actor), "reason": _text("reason", reason)}
    if expected_generation is not None:
        if isinstance(expected_generation, bool) or not isinstance(expected_generation, int) \
                or expected_generation < 0:
            raise invalid("expected_generation", f"expected_generation must be a non-negative integer "
                                                 f"or None, got {expected_generation!r}")
        fields["expected_generation"] = expected_generation
    if wait_for_replicas is not None:
        if isinstance(wait_for_replicas, bool) or not isinstance(wait_for_replicas, (int, float)) \
                or not 0 <= wait_for_replicas < math.inf:
            raise invalid("wait_for_replicas", f"wait_for_replicas must be a number of seconds >= 0 "
                                               f"or None, got {wait_for_replicas!r}")
        fields["wait_for_replicas_s"] = float(wait_for_replicas)
    return fields


def _percent(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise invalid("percent", f"percent must be an integer from 0 to 100, got {value!r}")
    return value


def get_rollout_request(index: str) -> pb.GetRolloutRequest:
    return pb.GetRolloutRequest(index=_text("index", index))


def start_canary_request(index: str, version: str, percent: int, *, expected_generation: int | None = None,
                         actor: str = "", reason: str = "",
                         wait_for_replicas: float | None = None) -> pb.StartCanaryRequest:
    return pb.StartCanaryRequest(index=_text("index", index), version=_text("version", version),
                                 percent=_percent(percent),
                                 **_change_fields(expected_generation, actor, reason, wait_for_replicas))


def set_canary_percent_request(index: str, percent: int, *, expected_generation: int | None = None,
                               actor: str = "", reason: str = "",
                               wait_for_replicas: float | None = None) -> pb.SetCanaryPercentRequest:
    return pb.SetCanaryPercentRequest(index=_text("index", index), percent=_percent(percent),
                                      **_change_fields(expected_generation, actor, reason, wait_for_replicas))


def set_shadow_request(index: str, version: str, percent: int = 100, *, expected_generation: int | None = None,
                       actor: str = "", reason: str = "",
                       wait_for_replicas: float | None = None) -> pb.SetShadowRequest:
    return pb.SetShadowRequest(index=_text("index", index), version=_text("version", version),
                               percent=_percent(percent),
                               **_change_fields(expected_generation, actor, reason, wait_for_replicas))


def set_stable_request(index: str, version: str, *, expected_generation: int | None = None,
                       actor: str = "", reason: str = "",
                       wait_for_replicas: float | None = None) -> pb.SetStableRequest:
    return pb.SetStableRequest(index=_text("index", index), version=_text("version", version),
                               **_change_fields(expected_generation, actor, reason, wait_for_replicas))


def clear_shadow_request(index: str, **change: Any) -> pb.ClearShadowRequest:
    """`change`: expected_generation, actor, reason, wait_for_replicas (as for every change)."""
    return pb.ClearShadowRequest(index=_text("index", index), **_change_fields(**change))


def promote_request(index: str, *, policy: PromotePolicy | None = None, **change: Any) -> pb.PromoteRequest:
    request = pb.PromoteRequest(index=_text("index", index), **_change_fields(**change))
    if policy is not None:
        request.policy.CopyFrom(promote_policy(policy))
    return request


def policy_of(policy: PromotePolicy | None, max_ndcg_drop: float | None = None,
              min_shadow_overlap: float | None = None,
              min_shadow_compared: int | None = None) -> PromotePolicy | None:
    """`policy`, or one made of its rules given as keywords (never both)."""
    rules = (max_ndcg_drop, min_shadow_overlap, min_shadow_compared)
    if all(r is None for r in rules):
        return policy
    if policy is not None:
        raise invalid("policy", "give a PromotePolicy or its rules as keywords, not both")
    return PromotePolicy(*rules)


def promote_policy(policy: PromotePolicy) -> pb.PromotePolicy:
    if not isinstance(policy, PromotePolicy):
        raise invalid("policy", f"policy must be a PromotePolicy, got {type(policy).__name__}")
    message = pb.PromotePolicy()
    for name in ("max_ndcg_drop", "min_shadow_overlap"):
        value = getattr(policy, name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise invalid(f"policy.{name}", f"policy.{name} must be a finite number or None, got {value!r}")
            setattr(message, name, float(value))
    if policy.min_shadow_compared is not None:
        value = policy.min_shadow_compared
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise invalid("policy.min_shadow_compared", f"policy.min_shadow_compared must be a non-negative "
                                                        f"integer or None, got {value!r}")
        message.min_shadow_compared = value
    return message


# --- evaluation ---------------------------------------------------------------------------------

def evaluate_request(index: str, queries: Iterable[EvalQuery | Mapping[str, Any]], *,
                     versions: Iterable[str] | None = None, k: int = 0, query_set: str = "",
                     record: bool = False, nprobe: int | None = None,
                     n_candidates: int | None = None) -> pb.EvaluateRequest:
    """`queries`: EvalQuery values, or dicts shaped like a query-set JSONL line
    ({"query_id", "query", "relevant": {doc_id: gain}}, "query_vectors" optional)."""
    if isinstance(versions, str):
        raise invalid("versions", "versions must be a list of version names, not one string")
    if isinstance(queries, (str, bytes, Mapping)):
        raise invalid("queries", "queries must be a list of EvalQuery values or dicts")
    knobs = {name: _uint(name, value) for name, value in (("nprobe", nprobe), ("n_candidates", n_candidates))
             if value}
    return pb.EvaluateRequest(index=_text("index", index), versions=[_text("versions", v) for v in versions or ()],
                              queries=[eval_query(q) for q in queries], k=_uint("k", k or 0),
                              query_set=_text("query_set", query_set), record=bool(record), **knobs)


def eval_query(value: EvalQuery | Mapping[str, Any]) -> pb.EvalQuery:
    if isinstance(value, Mapping):
        unknown = set(value) - {"query_id", "query", "relevant", "query_vectors"}
        if unknown:
            raise invalid("queries", f"unknown query keys {sorted(unknown)}; allowed: query_id, query, relevant, "
                                     f"query_vectors")
        value = EvalQuery(query_id=value.get("query_id", ""), query=value.get("query", ""),
                          relevant=value.get("relevant") or {}, query_vectors=value.get("query_vectors"))
    if not isinstance(value, EvalQuery):
        raise invalid("queries", f"each query must be an EvalQuery or a dict, got {type(value).__name__}")
    relevant = value.relevant
    if isinstance(relevant, (list, tuple, set, frozenset)):
        relevant = {doc: 1.0 for doc in relevant}
    if not isinstance(relevant, Mapping):
        raise invalid("queries.relevant", f"relevant must map doc id to gain, got {type(relevant).__name__}")
    judgements = []
    for doc, gain in relevant.items():
        if isinstance(gain, bool) or not isinstance(gain, (int, float)):
            raise invalid("queries.relevant", f"the gain of {doc!r} must be a number, got {gain!r}")
        judgements.append(pb.Judgement(doc_id=_text("queries.relevant", doc), relevance=float(gain)))
    message = pb.EvalQuery(query_id=_text("queries.query_id", value.query_id),
                           text=_text("queries.query", value.query), judgements=judgements)
    if value.query_vectors is not None:
        message.query_vectors.CopyFrom(to_multi_vector(value.query_vectors))
    return message


def rollback_request(index: str, **change: Any) -> pb.RollbackRequest:
    return pb.RollbackRequest(index=_text("index", index), **_change_fields(**change))


def abort_canary_request(index: str, **change: Any) -> pb.AbortCanaryRequest:
    return pb.AbortCanaryRequest(index=_text("index", index), **_change_fields(**change))


def rollout_history_request(index: str, limit: int = 0) -> pb.RolloutHistoryRequest:
    return pb.RolloutHistoryRequest(index=_text("index", index), limit=_uint("limit", limit))


# --- ingestion: options first, then documents, each its own IngestRequest ------------------------

INGEST_KINDS = ("text", "image", "pdf", "vectors")


def ingest_request(item: IngestOptions | IngestDoc | Mapping[str, Any]) -> pb.IngestRequest:
    """The request carrying `item`: the stream's options, or one document (an IngestDoc or a
    dict {"id", one of "text"/"image"/"pdf"/"vectors", "metadata"?, "filename"?})."""
    if isinstance(item, IngestOptions):
        return pb.IngestRequest(options=ingest_options(item))
    return pb.IngestRequest(document=ingest_document(item))


def ingest_options(options: IngestOptions) -> pb.IngestOptions:
    codec = _text("codec", options.codec)
    return pb.IngestOptions(index=_text("index", options.index), encoder_id=_text("encoder_id", options.encoder_id or ""),
                            codec="" if codec == "fp16" else codec, activate=bool(options.activate),
                            pool_factor=_uint("pool_factor", options.pool_factor),
                            external_vectors=bool(options.external_vectors),
                            pdf_dpi=_uint("pdf_dpi", options.pdf_dpi or 0),
                            n_centroids=_uint("n_centroids", options.n_centroids or 0),
                            actor=_text("actor", options.actor))


def ingest_document(doc: IngestDoc | Mapping[str, Any]) -> pb.IngestDocument:
    if isinstance(doc, Mapping):
        doc = _ingest_doc_of(doc)
    if not isinstance(doc, IngestDoc):
        raise invalid("documents", f"each document must be an IngestDoc or a dict, got {type(doc).__name__}")
    message = pb.IngestDocument(id=_text("documents.id", doc.id), filename=_text("documents.filename", doc.filename))
    if doc.kind == "text":
        message.text = _text("documents.text", doc.content)
    elif doc.kind in ("image", "pdf"):
        if not isinstance(doc.content, (bytes, bytearray, memoryview)):
            raise invalid(f"documents.{doc.kind}", f"document {doc.id!r}: {doc.kind} content must be bytes, "
                                                   f"got {type(doc.content).__name__}")
        setattr(message, doc.kind, bytes(doc.content))
    elif doc.kind == "vectors":
        try:
            message.vectors.CopyFrom(to_multi_vector(doc.content))
        except InvalidArgumentError as exc:
            raise invalid("documents.vectors", f"document {doc.id!r}: {exc.details}") from exc
    else:
        raise invalid("documents.kind", f"document {doc.id!r} has kind {doc.kind!r}; one of {', '.join(INGEST_KINDS)}")
    if doc.metadata:
        try:
            message.metadata.update(dict(doc.metadata))
        except (TypeError, ValueError, AttributeError) as exc:
            raise invalid("documents.metadata", f"document {doc.id!r}: metadata must hold JSON values "
                                                f"(str, number, bool, None, lists, dicts): {exc}") from exc
    return message


def _ingest_doc_of(value: Mapping[str, Any]) -> IngestDoc:
    unknown = set(value) - {"id", "metadata", "filename", *INGEST_KINDS}
    if unknown:
        raise invalid("documents", f"unknown document keys {sorted(unknown)}; allowed: id, text, image, pdf, "
                                   f"vectors, metadata, filename")
    kinds = [kind for kind in INGEST_KINDS if value.get(kind) is not None]
    if len(kinds) != 1:
        raise invalid("documents", f"document {value.get('id')!r} must have exactly one of text, image, pdf, vectors; "
                                   f"got {kinds or 'none'}")
    return IngestDoc(value.get("id", ""), kinds[0], value[kinds[0]], dict(value.get("metadata") or {}),
                     value.get("filename", ""))


def _uint(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT32_MAX:
        raise invalid(field, f"{field} must be a non-negative integer (0 = server default), "
                             f"got {value!r}")
    return value


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid(field, f"{field} must be a str, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

def from_patch_ref(message: pb.PatchRef) -> PatchRef:
    return PatchRef(row=message.row, col=message.col, box=(message.x0, message.y0, message.x1, message.y1))


def from_token_match(message: pb.TokenMatch) -> TokenMatch:
    return TokenMatch(query_index=message.query_index, query_token=message.query_token,
                      doc_token_index=message.doc_token_index, doc_token=message.doc_token,
                      start=message.start, end=message.end, similarity=message.similarity,
                      share=message.share,
                      patch=from_patch_ref(message.patch) if message.HasField("patch") else None,
                      pooled=tuple(from_patch_ref(p) for p in message.pooled))


def from_hit(message: pb.Hit, version: str = "") -> Hit:
    return Hit(doc_id=message.doc_id, score=message.score, rank=message.rank,
               metadata=from_struct(message.metadata), version=version,
               explanation=tuple(from_token_match(m) for m in message.explanation), kind=message.kind or "text")


def from_search_stats(message: pb.SearchStats) -> SearchStats:
    return SearchStats(encode_ms=message.encode_ms, candidates_ms=message.candidates_ms,
                       maxsim_ms=message.maxsim_ms, total_ms=message.total_ms,
                       candidates=message.candidates, query_tokens=message.query_tokens)


def from_search_response(message: pb.SearchResponse, request_id: str = "") -> SearchResult:
    """`request_id` stands in when the server did not echo one."""
    return SearchResult(index=message.index, version=message.version,
                        encoder_id=message.encoder_id,
                        hits=tuple(from_hit(h, message.version) for h in message.hits),
                        stats=from_search_stats(message.stats),
                        request_id=message.request_id or request_id,
                        generation=message.generation, role=message.role)


def from_explain_response(message: pb.ExplainResponse, query_token: int | None = None) -> Explanation:
    """`query_token` echoes the request's (the response does not carry it)."""
    rows, cols = message.grid_rows, message.grid_cols
    if len(message.patch_scores) != rows * cols:
        raise InternalError(f"server sent {len(message.patch_scores)} patch scores for a {rows}x{cols} grid")
    scores = list(message.patch_scores)
    return Explanation(index=message.index, version=message.version, doc_id=message.doc_id, score=message.score,
                       matches=tuple(from_token_match(m) for m in message.matches), kind=message.kind or "text",
                       grid=(rows, cols) if rows and cols else None,
                       patch_scores=[scores[r * cols:(r + 1) * cols] for r in range(rows)],
                       width=message.width, height=message.height, heatmap_png=message.heatmap_png,
                       encoder_id=message.encoder_id, query_token=query_token)


def from_encode_response(message: pb.EncodeResponse) -> list[Matrix]:
    return [from_multi_vector(v) for v in message.vectors]


def from_rollout(message: pb.Rollout) -> Rollout:
    return Rollout(index=message.index, stable=message.stable or None,
                   canary=message.canary or None, canary_percent=message.canary_percent,
                   shadow=message.shadow or None, shadow_percent=message.shadow_percent,
                   previous_stable=message.previous_stable or None,
                   generation=message.generation, updated_at=message.updated_at)


def from_replica_ack(message: pb.ReplicaAck) -> ReplicaAck:
    return ReplicaAck(replica_id=message.replica_id, address=message.address,
                      generation=message.generation if message.HasField("generation") else None,
                      last_seen=message.last_seen, live=message.live, acknowledged=message.acknowledged)


def from_shadow_stats(message: pb.ShadowStats) -> ShadowStats:
    return ShadowStats(primary=message.primary, shadow=message.shadow, sampled=message.sampled,
                       compared=message.compared, errors=message.errors, dropped=message.dropped,
                       mean_overlap=message.mean_overlap, mean_rank_correlation=message.mean_rank_correlation,
                       primary_p50_ms=message.primary_p50_ms, primary_p95_ms=message.primary_p95_ms,
                       shadow_p50_ms=message.shadow_p50_ms, shadow_p95_ms=message.shadow_p95_ms,
                       last_error=message.last_error)


def from_load_error(message: pb.LoadError) -> LoadError:
    return LoadError(version=message.version, check=message.check, message=message.message,
                     generation=message.generation, at=message.at)


def from_serving_version(message: pb.ServingVersion) -> ServingVersion:
    return ServingVersion(version=message.version, roles=tuple(message.roles), in_flight=message.in_flight,
                          draining=message.draining)


def from_rollout_status(message: pb.RolloutStatus) -> RolloutStatus:
    return RolloutStatus(
        rollout=from_rollout(message.rollout),
        replicas=tuple(from_replica_ack(r) for r in message.replicas),
        pending_replicas=tuple(message.pending_replicas),
        shadow_stats=tuple(from_shadow_stats(s) for s in message.shadow_stats),
        load_errors=tuple(from_load_error(e) for e in message.load_errors),
        replica_id=message.replica_id,
        served_generation=message.served_generation if message.HasField("served_generation") else None,
        versions=tuple(from_serving_version(v) for v in message.versions))


def from_audit_entry(message: pb.AuditEntry) -> AuditEntry:
    return AuditEntry(id=message.id, index=message.index, at=message.at, actor=message.actor,
                      action=message.action, reason=message.reason, before=from_rollout(message.before),
                      after=from_rollout(message.after))


def from_rollout_history_response(message: pb.RolloutHistoryResponse) -> list[AuditEntry]:
    return [from_audit_entry(e) for e in message.entries]


def from_index_info(message: pb.IndexInfo) -> IndexInfo:
    return IndexInfo(name=message.name, created_at=message.created_at,
                     rollout=from_rollout(message.rollout) if message.HasField("rollout") else None,
                     versions=message.versions, loaded=message.loaded)


def from_list_indexes_response(message: pb.ListIndexesResponse) -> list[IndexInfo]:
    return [from_index_info(i) for i in message.indexes]


def from_version(message: pb.Version) -> Version:
    return Version(index=message.index, version=message.version,
                   state=from_version_state(message.state), encoder_id=message.encoder_id,
                   encoder_kind=message.encoder_kind, dim=message.dim,
                   documents=message.documents, tokens=message.tokens,
                   storage_uri=message.storage_uri, build_params=from_struct(message.build_params),
                   manifest_sha256=message.manifest_sha256, created_at=message.created_at,
                   updated_at=message.updated_at, error=message.error,
                   evaluations=tuple(from_version_evaluation(e) for e in message.evaluations))


def from_version_evaluation(message: pb.VersionEvaluation) -> VersionEvaluation:
    return VersionEvaluation(version=message.version, query_set=message.query_set, queries=message.queries,
                             ndcg_at_10=message.ndcg_at_10, recall_at_k=message.recall_at_k, k=message.k,
                             mrr_at_10=message.mrr_at_10, latency_p50_ms=message.latency_p50_ms,
                             latency_p95_ms=message.latency_p95_ms, latency_p99_ms=message.latency_p99_ms,
                             evaluated_at=message.evaluated_at, metrics=dict(message.metrics))


def from_evaluate_response(message: pb.EvaluateResponse) -> list[VersionEvaluation]:
    return [from_version_evaluation(e) for e in message.results]


def from_judgement(message: pb.Judgement) -> tuple[str, float]:
    return message.doc_id, message.relevance


def from_eval_query(message: pb.EvalQuery) -> EvalQuery:
    return EvalQuery(query_id=message.query_id, query=message.text,
                     relevant=dict(from_judgement(j) for j in message.judgements),
                     query_vectors=from_multi_vector(message.query_vectors)
                     if message.HasField("query_vectors") else None)


def from_promote_policy(message: pb.PromotePolicy) -> PromotePolicy:
    def optional(name: str) -> Any:
        return getattr(message, name) if message.HasField(name) else None

    return PromotePolicy(max_ndcg_drop=optional("max_ndcg_drop"), min_shadow_overlap=optional("min_shadow_overlap"),
                         min_shadow_compared=optional("min_shadow_compared"))


def from_list_versions_response(message: pb.ListVersionsResponse) -> list[Version]:
    return [from_version(v) for v in message.versions]


def from_version_state(value: int) -> VersionState:
    if value == pb.VERSION_STATE_UNSPECIFIED or value not in pb.VersionState.values():
        return VersionState.UNSPECIFIED  # includes states added by a newer server
    return VersionState(pb.VersionState.Name(value))


def from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _from_value(value) for key, value in message.fields.items()}


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(value.struct_value)
    if kind == "list_value":
        return [_from_value(v) for v in value.list_value.values]
    if kind == "number_value":
        number = value.number_value
        # Struct has only doubles; metadata such as `page: 3` was an integer in the JSON.
        if math.isfinite(number) and number.is_integer() and abs(number) <= 2**53:
            return int(number)
        return number
    if kind in ("string_value", "bool_value"):
        return getattr(value, kind)
    return None


# --- ingestion ---------------------------------------------------------------------------------

def from_ingest_options(message: pb.IngestOptions) -> IngestOptions:
    return IngestOptions(index=message.index, encoder_id=message.encoder_id, codec=message.codec or "fp16",
                         activate=message.activate, pool_factor=message.pool_factor or 1,
                         external_vectors=message.external_vectors, pdf_dpi=message.pdf_dpi,
                         n_centroids=message.n_centroids, actor=message.actor)


def from_ingest_document(message: pb.IngestDocument) -> IngestDoc:
    kind = message.WhichOneof("content") or ""
    content = from_multi_vector(message.vectors) if kind == "vectors" else getattr(message, kind, None) if kind else None
    return IngestDoc(message.id, kind, content, from_struct(message.metadata), message.filename)


def from_ingest_error(message: pb.IngestError) -> IngestError:
    return IngestError(document=message.document, code=message.code, message=message.message)


def from_ingest_progress(message: pb.IngestProgress) -> IngestProgress:
    return IngestProgress(stage=message.stage, received=message.received, encoded=message.encoded,
                          failed=message.failed, errors=tuple(from_ingest_error(e) for e in message.errors),
                          elapsed_s=message.elapsed_s,
                          version=from_version(message.version) if message.HasField("version") else None)
