"""Protobuf <-> domain conversion for the server. The only server module importing *_pb2."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_registry import AuditEntry, IndexRecord, Rollout, VersionRecord, VersionState
from colgrid_server.encoders.types import EncodedText
from colgrid_server.errors import InvalidArgument
from colgrid_server.evaluation import Evaluation, JudgedQuery, PromotePolicy
from colgrid_server.search import DocumentFilter, FieldCondition, Hit, PatchRef, SearchResult, TokenMatch
from colgrid_server.serving import Acknowledgements, LoadFailure, ShadowStats, VersionUse

_STATE = {
    VersionState.BUILDING: pb.BUILDING,
    VersionState.READY: pb.READY,
    VersionState.FAILED: pb.FAILED,
    VersionState.RETIRED: pb.RETIRED,
}


def to_struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        # Round-trip through JSON so numpy scalars, tuples etc. become plain JSON values.
        ParseDict(json.loads(json.dumps(value, default=str)), out)
    return out


def matrix_from_pb(mv: pb.MultiVector, *, field: str, expected_dim: int) -> np.ndarray:
    """A validated float32 (rows, dim) array from a MultiVector."""
    if mv.rows == 0 or mv.dim == 0:
        raise InvalidArgument(f"{field} is empty: rows and dim must be positive", field=field)
    if mv.dim != expected_dim:
        raise InvalidArgument(f"{field} has dim {mv.dim}; this index's encoder produces dim {expected_dim}",
                              field=f"{field}.dim")
    if len(mv.data) != mv.rows * mv.dim * 4:
        raise InvalidArgument(f"{field}.data has {len(mv.data)} bytes; rows*dim*4 = {mv.rows * mv.dim * 4}",
                              field=f"{field}.data")
    arr = np.frombuffer(mv.data, dtype="<f4").reshape(mv.rows, mv.dim).astype(np.float32)
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{field} contains NaN or infinite values", field=f"{field}.data")
    return arr


def filter_from_pb(f: pb.Filter) -> DocumentFilter | None:
    """The domain filter of a request (None when it sets nothing); InvalidArgument names the
    condition at fault."""
    conditions = []
    for position, c in enumerate(f.must):
        values = []
        for value in c.any_of:
            kind = value.WhichOneof("kind")
            if kind not in ("string_value", "number_value", "bool_value"):
                raise InvalidArgument(f"filter.must[{position}].any_of holds a {kind or 'unset value'}; "
                                      "use strings, numbers or booleans", field=f"filter.must[{position}].any_of")
            values.append(getattr(value, kind))
        bounds = {name: getattr(c, name) for name in ("gte", "gt", "lte", "lt") if c.HasField(name)}
        conditions.append(FieldCondition(field=c.field, any_of=tuple(values), negate=c.negate, **bounds))
    spec = DocumentFilter(must=tuple(conditions), doc_ids=tuple(f.doc_ids))
    return None if spec.empty else spec


def multivector(encoded: EncodedText) -> pb.MultiVector:
    vectors = np.ascontiguousarray(encoded.vectors, dtype="<f4")
    return pb.MultiVector(rows=vectors.shape[0], dim=vectors.shape[1], data=vectors.tobytes(),
                          tokens=list(encoded.tokens),
                          span_starts=[int(s) for s in encoded.spans[:, 0]],
                          span_ends=[int(e) for e in encoded.spans[:, 1]])


def _float(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


def patch_ref(p: PatchRef) -> pb.PatchRef:
    x0, y0, x1, y1 = p.box
    return pb.PatchRef(row=p.row, col=p.col, x0=x0, y0=y0, x1=x1, y1=y1)


def token_match(m: TokenMatch) -> pb.TokenMatch:
    message = pb.TokenMatch(query_index=m.query_index, query_token=m.query_token,
                            doc_token_index=m.doc_token_index, doc_token=m.doc_token, start=m.start,
                            end=m.end, similarity=_float(m.similarity), share=_float(m.share),
                            pooled=[patch_ref(p) for p in m.pooled])
    if m.patch is not None:
        message.patch.CopyFrom(patch_ref(m.patch))
    return message


def hit(h: Hit) -> pb.Hit:
    return pb.Hit(
        doc_id=h.doc_id, score=_float(h.score), rank=h.rank, metadata=to_struct(h.metadata),
        explanation=[token_match(m) for m in h.explanation], kind=h.kind,
    )


def search_response(*, request_id: str, index: str, version: str, encoder_id: str,
                    result: SearchResult, encode_ms: float, total_ms: float, generation: int = 0,
                    role: str = "") -> pb.SearchResponse:
    s = result.stats
    return pb.SearchResponse(
        request_id=request_id, index=index, version=version, encoder_id=encoder_id,
        generation=generation, role=role, hits=[hit(h) for h in result.hits],
        stats=pb.SearchStats(encode_ms=encode_ms, candidates_ms=s.candidates_ms, maxsim_ms=s.maxsim_ms,
                             total_ms=total_ms, candidates=s.candidates, query_tokens=s.query_tokens),
    )


def encode_response(encoded: Sequence[EncodedText], *, encoder_id: str, version: str = "") -> pb.EncodeResponse:
    return pb.EncodeResponse(encoder_id=encoder_id, version=version, vectors=[multivector(e) for e in encoded])


def _ts(value: datetime | None) -> str:
    return value.isoformat() if value else ""


def rollout(r: Rollout) -> pb.Rollout:
    return pb.Rollout(index=r.index, stable=r.stable or "", canary=r.canary or "",
                      canary_percent=r.canary_percent or 0, shadow=r.shadow or "",
                      shadow_percent=r.shadow_percent or 0, previous_stable=r.previous_stable or "",
                      generation=r.generation, updated_at=_ts(r.updated_at))


def version(v: VersionRecord, evaluations: Sequence[Evaluation] = ()) -> pb.Version:
    return pb.Version(index=v.index, version=v.version, state=_STATE[v.state], encoder_id=v.encoder_id or "",
                      encoder_kind=v.encoder_kind or "", dim=v.dim or 0, documents=v.documents or 0,
                      tokens=v.tokens or 0, storage_uri=v.storage_uri or "",
                      build_params=to_struct(v.build_params), manifest_sha256=v.manifest_sha256 or "",
                      created_at=_ts(v.created_at), updated_at=_ts(v.updated_at), error=v.error or "",
                      evaluations=[version_evaluation(e) for e in evaluations])


# --- evaluation --------------------------------------------------------------------------------

def version_evaluation(e: Evaluation) -> pb.VersionEvaluation:
    return pb.VersionEvaluation(
        version=e.version, query_set=e.query_set, queries=e.queries, ndcg_at_10=e.ndcg_at_10,
        recall_at_k=e.recall_at_k, k=e.k, mrr_at_10=e.mrr_at_10, latency_p50_ms=e.latency_p50_ms,
        latency_p95_ms=e.latency_p95_ms, latency_p99_ms=e.latency_p99_ms, evaluated_at=_ts(e.evaluated_at),
        metrics={name: _float(value) for name, value in e.metrics.items()})


def evaluate_response(index: str, results: Sequence[Evaluation]) -> pb.EvaluateResponse:
    return pb.EvaluateResponse(index=index, results=[version_evaluation(e) for e in results])


def judged_query(q: pb.EvalQuery, position: int) -> JudgedQuery:
    """The domain query of an EvalQuery (checked later, with the whole set, by check_queries)."""
    relevance: dict[str, float] = {}
    for j in q.judgements:
        if j.doc_id in relevance:
            raise InvalidArgument(f"query {q.query_id!r} judges {j.doc_id!r} twice",
                                  field=f"queries[{position}].judgements")
        relevance[j.doc_id] = j.relevance
    vectors = None
    if q.HasField("query_vectors"):
        field = f"queries[{position}].query_vectors"
        vectors = matrix_from_pb(q.query_vectors, field=field, expected_dim=q.query_vectors.dim)
    return JudgedQuery(query_id=q.query_id, text=q.text, relevance=relevance, vectors=vectors)


def promote_policy(request: pb.PromoteRequest) -> PromotePolicy | None:
    """The request's policy; None when it sets no rule."""
    if not request.HasField("policy"):
        return None
    p = request.policy
    policy = PromotePolicy(
        max_ndcg_drop=p.max_ndcg_drop if p.HasField("max_ndcg_drop") else None,
        min_shadow_overlap=p.min_shadow_overlap if p.HasField("min_shadow_overlap") else None,
        min_shadow_compared=p.min_shadow_compared if p.HasField("min_shadow_compared") else None)
    return None if policy.empty else policy


def index_info(record: IndexRecord, r: Rollout, *, versions: int, loaded: bool) -> pb.IndexInfo:
    return pb.IndexInfo(name=record.name, created_at=_ts(record.created_at), rollout=rollout(r),
                        versions=versions, loaded=loaded)


# --- rollouts ----------------------------------------------------------------------------------

def _pointers(index: str, pointers: Mapping[str, Any]) -> pb.Rollout:
    """A Rollout message from an audit entry's pointer snapshot."""
    return pb.Rollout(index=index, stable=pointers.get("stable") or "", canary=pointers.get("canary") or "",
                      canary_percent=pointers.get("canary_percent") or 0, shadow=pointers.get("shadow") or "",
                      shadow_percent=pointers.get("shadow_percent") or 0,
                      previous_stable=pointers.get("previous_stable") or "",
                      generation=pointers.get("generation") or 0)


def audit_entry(e: AuditEntry) -> pb.AuditEntry:
    return pb.AuditEntry(id=e.id, index=e.index, at=_ts(e.at), actor=e.actor, action=e.action, reason=e.reason,
                         before=_pointers(e.index, e.before), after=_pointers(e.index, e.after))


def shadow_stats(s: ShadowStats) -> pb.ShadowStats:
    return pb.ShadowStats(primary=s.primary, shadow=s.shadow, sampled=s.sampled, compared=s.compared,
                          errors=s.errors, dropped=s.dropped, mean_overlap=s.mean_overlap,
                          mean_rank_correlation=s.mean_rbo, primary_p50_ms=s.primary_p50_ms,
                          primary_p95_ms=s.primary_p95_ms, shadow_p50_ms=s.shadow_p50_ms,
                          shadow_p95_ms=s.shadow_p95_ms, last_error=s.last_error)


def load_error(f: LoadFailure) -> pb.LoadError:
    return pb.LoadError(version=f.version, check=f.check, message=f.message, generation=f.generation,
                        at=_ts(datetime.fromtimestamp(f.at, timezone.utc)))


def serving_version(v: VersionUse) -> pb.ServingVersion:
    return pb.ServingVersion(version=v.version, roles=list(v.roles), in_flight=v.in_flight, draining=v.draining)


def rollout_status(r: Rollout, acks: Acknowledgements, *, replica_id: str, served_generation: int | None,
                   shadow: Sequence[ShadowStats], failures: Sequence[LoadFailure],
                   versions: Sequence[VersionUse]) -> pb.RolloutStatus:
    replicas = []
    for rec in acks.replicas:
        ack = pb.ReplicaAck(replica_id=rec.replica_id, address=rec.address, last_seen=_ts(rec.last_seen),
                            live=rec.live, acknowledged=rec.acknowledges(r.index, r.generation))
        if r.index in rec.served:
            ack.generation = rec.served[r.index]
        replicas.append(ack)
    status = pb.RolloutStatus(rollout=rollout(r), replicas=replicas, pending_replicas=list(acks.pending),
                              shadow_stats=[shadow_stats(s) for s in shadow],
                              load_errors=[load_error(f) for f in failures], replica_id=replica_id,
                              versions=[serving_version(v) for v in versions])
    if served_generation is not None:
        status.served_generation = served_generation
    return status
