"""Run a judged query set against one or two pinned versions of an index.

Each version is named, never routed: it is leased from the serving state (loaded, checked and
warmed first if this server does not hold it), so a rollout during the run cannot unload it and
every query of a version's run is answered by that version alone. With two versions the queries
alternate between them, so load on the machine weighs on both latency distributions alike.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from colgrid_server.errors import ColgridError, FailedPrecondition, InvalidArgument
from colgrid_server.evaluation import _metrics as m
from colgrid_server.evaluation._queries import JudgedQuery, check_queries, query_set_name
from colgrid_server.evaluation._results import (
    JUDGED_MISSING, LATENCY_P50, LATENCY_P95, LATENCY_P99, MRR, NDCG, QUERIES, Evaluation, recall_name)
from colgrid_server.search import SearchParams
from colgrid_server.serving import Query, ServedVersion, ServingState

MAX_VERSIONS = 2
DEFAULT_ACTOR = "api"
LEASE_ATTEMPTS = 3  # a version unloaded between its check and its lease is looked up again


class EvaluationStopped(ColgridError):
    """The caller went away (cancelled, deadline passed): the run stopped between queries."""

    code = "CANCELLED"


@dataclass(frozen=True)
class EvalOptions:
    """k: the recall cut-off; the search asks for max(k, 10) hits so nDCG@10 and MRR@10 are
    always computable. nprobe / n_candidates: search knobs (None: the server defaults)."""

    k: int = m.DEFAULT_RECALL_K
    nprobe: int | None = None
    n_candidates: int | None = None

    def params(self) -> SearchParams:
        return SearchParams.from_request(k=max(self.k, m.NDCG_CUTOFF, m.MRR_CUTOFF), nprobe=self.nprobe,
                                         n_candidates=self.n_candidates)


class _Tally:
    """Per-query scores of one version."""

    def __init__(self, served: ServedVersion, queries: Sequence[JudgedQuery]) -> None:
        self.served = served
        self.ndcg: list[float] = []
        self.recall: list[float] = []
        self.rr: list[float] = []
        self.latency_ms: list[float] = []
        present = set(served.loaded.doc_ids)
        judged = sum(len(q.relevant) for q in queries)
        self.judged_missing = sum(len(q.relevant - present) for q in queries)
        if self.judged_missing == judged:
            raise InvalidArgument(f"none of the {judged} relevant documents judged is in {served.index}/"
                                  f"{served.version}: do the judgements use this index's document ids?",
                                  field="queries")
        dim = served.encoder.dim
        for q in queries:
            if q.vectors is not None and (q.vectors.ndim != 2 or q.vectors.shape[1] != dim):
                raise InvalidArgument(f"query {q.query_id!r} has vectors of shape {tuple(q.vectors.shape)}; "
                                      f"{served.index}/{served.version}'s encoder produces dim {dim}",
                                      field="queries.query_vectors")

    def add(self, q: JudgedQuery, ranking: Sequence[str], latency_ms: float, k: int) -> None:
        self.ndcg.append(m.ndcg_at(ranking, q.relevance))
        self.recall.append(m.recall_at(ranking, q.relevance, k))
        self.rr.append(m.reciprocal_rank_at(ranking, q.relevance))
        self.latency_ms.append(latency_ms)

    def result(self, query_set: str, k: int) -> Evaluation:
        metrics = {
            NDCG: m.mean(self.ndcg), recall_name(k): m.mean(self.recall), MRR: m.mean(self.rr),
            LATENCY_P50: m.percentile(self.latency_ms, 50), LATENCY_P95: m.percentile(self.latency_ms, 95),
            LATENCY_P99: m.percentile(self.latency_ms, 99),
            QUERIES: float(len(self.ndcg)), JUDGED_MISSING: float(self.judged_missing),
        }
        return Evaluation(self.served.index, self.served.version, query_set, metrics,
                          evaluated_at=datetime.now(timezone.utc))


def run_queries(versions: Sequence[ServedVersion], queries: Sequence[JudgedQuery], *, query_set: str,
                options: EvalOptions = EvalOptions(), stop: threading.Event | None = None) -> list[Evaluation]:
    """Search every query on every version (held under lease by the caller) and score the
    rankings; latency is each search's own time, query encoding included."""
    params = options.params()
    tallies = [_Tally(served, queries) for served in versions]
    for q in queries:
        if stop is not None and stop.is_set():
            raise EvaluationStopped(f"evaluation stopped after {len(tallies[0].ndcg)} of {len(queries)} queries")
        query = Query(params=params, text=q.text or None, vectors=q.vectors)
        for tally in tallies:
            answer = tally.served.search(query)
            tally.add(q, answer.doc_ids, answer.total_ms, options.k)
    return [t.result(query_set, options.k) for t in tallies]


class Evaluator:
    """Evaluations of an index's versions on this server, recorded in its registry on request."""

    def __init__(self, state: ServingState) -> None:
        self._state = state
        self._registry = state.registry

    def default_versions(self, index: str) -> list[str]:
        """The stable version, and the canary when one runs."""
        rollout = self._registry.get_rollout(index)
        if not rollout.stable:
            raise FailedPrecondition(f"index {index!r} has no stable version to evaluate; name the versions "
                                     f"(see `colgrid registry show {index}`)")
        return [rollout.stable, *([rollout.canary] if rollout.canary else [])]

    def evaluate(self, index: str, versions: Sequence[str], queries: Sequence[JudgedQuery], *,
                 query_set: str = "", options: EvalOptions = EvalOptions(), record: bool = False,
                 actor: str = DEFAULT_ACTOR, stop: threading.Event | None = None) -> list[Evaluation]:
        """Scores of each of `versions` (one or two; none: see default_versions) in that order."""
        self._registry.get_index(index)  # NotFound before anything else
        names = self._versions(index, versions)
        check_queries(queries)
        query_set = query_set.strip() or query_set_name(queries)
        with ExitStack() as stack:
            served = [self._lease(stack, index, name) for name in names]
            results = run_queries(served, queries, query_set=query_set, options=options, stop=stop)
        if not record:
            return results
        recorded = []
        for r in results:
            entry = self._registry.record_evaluation(index, r.version, metrics=r.metrics, query_set=query_set,
                                                     actor=actor or DEFAULT_ACTOR)
            recorded.append(replace(r, evaluated_at=entry.at, recorded=True))
        return recorded

    def _versions(self, index: str, versions: Sequence[str]) -> list[str]:
        names = list(versions) or self.default_versions(index)
        if len(names) > MAX_VERSIONS:
            raise InvalidArgument(f"{len(names)} versions named; an evaluation compares at most {MAX_VERSIONS}",
                                  field="versions")
        if len(set(names)) != len(names):
            raise InvalidArgument(f"version {names[0]!r} is named twice", field="versions")
        for name in names:
            if not name:
                raise InvalidArgument("an empty version name (e.g. v2; see ListVersions)", field="versions")
            self._registry.get_version(index, name)  # VersionNotFound names it
        return names

    def _lease(self, stack: ExitStack, index: str, version: str) -> ServedVersion:
        for _ in range(LEASE_ATTEMPTS):
            with self._state.prepared(index, version) as served:
                lease = served.acquire()
            if lease is not None:
                stack.callback(lease.release)
                return served
        raise FailedPrecondition(f"{index}/{version} was unloaded {LEASE_ATTEMPTS} times while being leased; retry")
