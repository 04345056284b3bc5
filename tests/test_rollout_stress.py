"""Rollouts under load: clients search continuously while the alias changes hundreds of times.

The guarantees checked for every answer:
- no request fails (no NOT_FOUND, UNAVAILABLE or anything else during a switch);
- the version that answered was live (stable or canary) at some moment of the request's window,
  and it is the pointer its role names in the rollout generation the answer reports;
- the answer is identical to that version's own answer, computed here by loading the version
  alone (same files, same encoder) outside the server;
- a stream's answers all come from the version it started on.

`run_stress` is also the engine of bench/soak_rollouts.py (1,000 changes, run by hand).
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from colgrid_client import Client
from colgrid_registry import open_registry
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.paths import DataDir
from colgrid_server.search import SearchParams
from colgrid_server.serving import Query, load_version
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    INDEX, QUERIES, build_versions, other_tiny_encoder_dir, rollout_documents, serving, three_versions,
    tiny_checkpoint, tiny_encoder_dir, version_template)

K = 5


@dataclass(frozen=True)
class Observed:
    started: float
    finished: float
    query: str
    version: str
    role: str
    generation: int
    doc_ids: tuple[str, ...]
    scores: tuple[float, ...]
    stream: int = -1  # the stream it came from, -1 for a unary search


@dataclass(frozen=True)
class Change:
    started: float
    finished: float
    action: str
    stable: str
    canary: str | None
    generation: int


@dataclass
class StressReport:
    changes: list[Change] = field(default_factory=list)
    observed: list[Observed] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> str:
        latencies = sorted(o.finished - o.started for o in self.observed if o.stream < 0)
        p = (lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000) if latencies else (
            lambda q: 0.0)
        versions = Counter(o.version for o in self.observed)
        actions = Counter(c.action for c in self.changes[1:])  # [0] is the rollout before any change
        return (f"{len(self.changes) - 1} alias changes ({dict(actions)}) in {self.elapsed_s:.1f}s; "
                f"{len(self.observed)} answers ({dict(sorted(versions.items()))}), {len(self.failures)} failed, "
                f"{len(self.violations)} violations; unary latency p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms")


def expected_answers(data_dir: Path, versions: list[str]) -> dict[tuple[str, str], tuple[tuple[str, ...], tuple]]:
    """Each version's own answer to each query: loaded alone, outside the server."""
    data = DataDir(data_dir)
    catalog = EncoderCatalog(data.encoders)
    answers = {}
    with open_registry(data.registry_file) as registry:
        for name in versions:
            served = load_version(registry.get_version(INDEX, name), catalog)
            for query in QUERIES:
                hits = served.search(Query(params=SearchParams(k=K), text=query)).result.hits
                answers[(name, query)] = (tuple(h.doc_id for h in hits), tuple(float(h.score) for h in hits))
            served.retire()
    return answers


def _next_change(client: Client, rng: random.Random, versions: list[str], rollout) -> tuple[str, object]:
    others = [v for v in versions if v != rollout.stable]
    if rng.random() < 0.1:  # shadow churn too: load, compare, unload, under the same traffic
        if rollout.shadow is None:
            return "set_shadow", client.set_shadow(INDEX, rng.choice(others), 50)
        return "clear_shadow", client.clear_shadow(INDEX)
    if rollout.canary is None:
        if rollout.previous_stable is not None and rng.random() < 0.25:
            return "rollback", client.rollback(INDEX)
        return "start_canary", client.start_canary(INDEX, rng.choice(others), rng.randint(1, 99))
    action = rng.choice(["promote", "abort_canary", "set_canary_percent", "rollback"])
    if action == "promote":
        return action, client.promote(INDEX)
    if action == "abort_canary":
        return action, client.abort_canary(INDEX)
    if action == "rollback" and rollout.previous_stable is not None:
        return action, client.rollback(INDEX)
    return "set_canary_percent", client.set_canary_percent(INDEX, rng.randint(0, 100))


def run_stress(target: str, versions: list[str], *, changes: int, clients: int, streams: int = 2,
               seed: int = 0) -> StressReport:
    """`clients` threads search (of which `streams` use SearchStream) while this thread makes
    `changes` rollout changes through the RolloutService as fast as they complete."""
    report = StressReport()
    stop = threading.Event()
    lock = threading.Lock()

    def search_loop(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        with Client(target, timeout=60, retries=0) as client:
            while not stop.is_set():
                try:
                    if number < streams:
                        queries = [rng.choice(QUERIES) for _ in range(8)]
                        started = time.monotonic()
                        results = client.search_stream(INDEX, queries, k=K, routing_key=f"s{number}-{rng.random()}")
                        observed = []
                        for query, result in zip(queries, results):
                            observed.append(_observe(started, time.monotonic(), query, result, stream=number))
                        if len(observed) != len(queries):
                            raise AssertionError(f"stream answered {len(observed)} of {len(queries)} queries")
                    else:
                        query = rng.choice(QUERIES)
                        started = time.monotonic()
                        result = client.search(INDEX, query, k=K, routing_key=f"user-{rng.randrange(10_000)}")
                        observed = [_observe(started, time.monotonic(), query, result)]
                    with lock:
                        report.observed.extend(observed)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        report.failures.append(f"client {number}: {type(exc).__name__}: {exc}")

    rng = random.Random(seed)
    threads = [threading.Thread(target=search_loop, args=(i,), daemon=True) for i in range(clients)]
    began = time.monotonic()
    with Client(target, timeout=120, retries=0) as admin:
        status = admin.get_rollout(INDEX)
        rollout = status.rollout
        report.changes.append(Change(float("-inf"), float("-inf"), "initial", rollout.stable, rollout.canary,
                                     rollout.generation))
        for t in threads:
            t.start()
        try:
            while len(report.changes) <= changes:
                started = time.monotonic()
                action, status = _next_change(admin, rng, versions, rollout)
                rollout = status.rollout
                report.changes.append(Change(started, time.monotonic(), action, rollout.stable, rollout.canary,
                                             rollout.generation))
        finally:
            stop.set()
            for t in threads:
                t.join(120)
    report.elapsed_s = time.monotonic() - began
    return report


def _observe(started: float, finished: float, query: str, result, *, stream: int = -1) -> Observed:
    return Observed(started, finished, query, result.version, result.role, result.generation,
                    tuple(h.doc_id for h in result.hits), tuple(h.score for h in result.hits), stream)


def check(report: StressReport, expected: dict) -> list[str]:
    """Every guarantee in the module docstring, as a list of violations (empty: all held)."""
    history = report.changes  # [0] is the initial rollout, live until the first change finished
    by_generation = {c.generation: c for c in history}
    violations = []
    streams: dict[tuple[int, float], set[str]] = {}
    for o in report.observed:
        live = set()
        for i, c in enumerate(history):
            # Rollout i is published during change i and replaced during change i + 1.
            replaced = history[i + 1].finished if i + 1 < len(history) else float("inf")
            if c.started <= o.finished and replaced >= o.started:
                live |= {c.stable} | ({c.canary} if c.canary else set())
        if o.version not in live:
            violations.append(f"{o.version} answered {o.query!r} but was not live in its window")
        routed_by = by_generation.get(o.generation)
        pointer = None if routed_by is None else routed_by.stable if o.role == "stable" else routed_by.canary
        if pointer != o.version:
            violations.append(f"{o.version} answered as {o.role} of generation {o.generation}, which names {pointer}")
        want_ids, want_scores = expected[(o.version, o.query)]
        if o.doc_ids != want_ids or any(abs(a - b) > 1e-5 for a, b in zip(o.scores, want_scores)):
            violations.append(f"{o.version} answered {o.query!r} with {o.doc_ids}, alone it answers {want_ids}")
        if o.stream >= 0:
            streams.setdefault((o.stream, o.started), set()).add(o.version)
    violations += [f"stream {key} mixed versions {sorted(v)}" for key, v in streams.items() if len(v) > 1]
    return violations


def stress_versions(data_dir: Path, tiny: Path, other: Path, documents) -> list[str]:
    """v1-v3 (tiny-bert) plus one version on another encoder, so cutovers also switch encoders."""
    (other_version,) = build_versions(data_dir, other, documents, 1, first=3)
    return ["v1", "v2", "v3", other_version]


def test_hundreds_of_alias_changes_under_continuous_search_fail_nothing_and_mix_nothing(
        three_versions, tiny_encoder_dir, other_tiny_encoder_dir, rollout_documents):
    versions = stress_versions(three_versions, tiny_encoder_dir, other_tiny_encoder_dir, rollout_documents)
    expected = expected_answers(three_versions, versions)
    with serving(three_versions, registry_poll_seconds=0.5) as s:
        report = run_stress(s.target, versions, changes=200, clients=8)
        assert s.state.shadow.drain()
        held = s.client.get_rollout(INDEX).versions
    print(report.summary())
    assert report.failures == []
    assert len(report.changes) - 1 >= 200
    assert len(report.observed) >= 1000
    assert check(report, expected) == []
    assert {o.version for o in report.observed} == set(versions)
    assert [(v.in_flight, v.draining) for v in held] == [(0, False)] * len(held), held  # drained, unloaded
