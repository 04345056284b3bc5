"""Shadow traffic: the same query on the shadow version, after the real answer has gone out.

Nothing the shadow does reaches a caller: its results are only compared with the answer that
was returned, and its errors are only counted. It runs on its own small pool behind a bounded
queue, so under load shadow work is what gets dropped (and counted), never primary work.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from colgrid_server.serving._versions import Answer, Lease, Query

log = logging.getLogger(__name__)

RBO_P = 0.9  # rank-biased overlap persistence: the top 10 carry ~86% of the weight
LATENCY_WINDOW = 1024  # latencies kept per version pair for the percentiles


def overlap_at_k(primary: Sequence[str], shadow: Sequence[str], k: int) -> float:
    """|top-k(primary) ∩ top-k(shadow)| / k, k capped by the longer list (a tiny index may hold
    fewer than k documents); 1.0 when both are empty."""
    depth = min(k, max(len(primary), len(shadow)))
    if depth == 0:
        return 1.0
    return len(set(primary[:depth]) & set(shadow[:depth])) / depth


def rank_biased_overlap(primary: Sequence[str], shadow: Sequence[str], p: float = RBO_P) -> float:
    """Extrapolated rank-biased overlap (Webber, Moffat & Zobel 2010, eq. 32) of two rankings
    cut at the same depth: 1.0 for identical lists, 0.0 for disjoint ones, top ranks weigh most."""
    depth = max(len(primary), len(shadow))
    if depth == 0:
        return 1.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    overlap = 0
    total = 0.0
    for d in range(1, depth + 1):
        a = primary[d - 1] if d <= len(primary) else None
        b = shadow[d - 1] if d <= len(shadow) else None
        if a is not None and b is not None and a == b:
            overlap += 1
        else:
            if a is not None:
                overlap += a in seen_b
                seen_a.add(a)
            if b is not None:
                overlap += b in seen_a
                seen_b.add(b)
        total += overlap / d * p**d
    return float(overlap / depth * p**depth + (1 - p) / p * total)


@dataclass(frozen=True)
class ShadowStats:
    """Comparisons of one (primary, shadow) version pair on this server since it started."""

    index: str
    primary: str
    shadow: str
    sampled: int          # requests picked for shadowing
    compared: int         # shadow answers compared with the primary's
    errors: int           # shadow searches that failed (never surfaced to callers)
    dropped: int          # shed because the shadow queue was full
    mean_overlap: float   # overlap@k, k as requested
    mean_rbo: float       # rank-biased overlap, p = RBO_P
    primary_p50_ms: float
    primary_p95_ms: float
    shadow_p50_ms: float
    shadow_p95_ms: float
    last_error: str = ""


class _PairStats:
    def __init__(self) -> None:
        self.sampled = self.compared = self.errors = self.dropped = 0
        self.overlap_sum = self.rbo_sum = 0.0
        self.primary_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.shadow_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_error = ""

    def view(self, index: str, primary: str, shadow: str) -> ShadowStats:
        n = max(self.compared, 1)
        return ShadowStats(index=index, primary=primary, shadow=shadow, sampled=self.sampled,
                           compared=self.compared, errors=self.errors, dropped=self.dropped,
                           mean_overlap=self.overlap_sum / n if self.compared else 0.0,
                           mean_rbo=self.rbo_sum / n if self.compared else 0.0,
                           primary_p50_ms=_percentile(self.primary_ms, 50),
                           primary_p95_ms=_percentile(self.primary_ms, 95),
                           shadow_p50_ms=_percentile(self.shadow_ms, 50),
                           shadow_p95_ms=_percentile(self.shadow_ms, 95), last_error=self.last_error)


def _percentile(values: deque[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else 0.0


class ShadowRunner:
    """Runs shadow searches on `workers` threads with at most `capacity` waiting or running."""

    def __init__(self, *, workers: int = 1, capacity: int = 32, name: str = "shadow") -> None:
        """name: of its threads (colgrid-<name>). The recall sampler is a ShadowRunner too: the
        same version searched exhaustively stands in for the shadow version."""
        if workers < 1 or capacity < 1:
            raise ValueError(f"shadow workers and capacity must be >= 1, got {workers}, {capacity}")
        self.capacity = capacity
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"colgrid-{name}")
        self._lock = threading.Lock()
        self._pending = 0
        self._stats: dict[tuple[str, str, str], _PairStats] = {}
        self._closed = False

    def submit(self, shadow: Lease, query: Query, primary_version: str, primary: Answer) -> bool:
        """Compare `primary` (already returned to the caller) with the shadow's answer to the
        same query, in the background. Takes ownership of the lease. False when shed."""
        key = (shadow.version.index, primary_version, shadow.version.version)
        with self._lock:
            stats = self._stats.setdefault(key, _PairStats())
            stats.sampled += 1
            if self._closed or self._pending >= self.capacity:
                stats.dropped += 1
                shed = True
            else:
                self._pending += 1
                shed = False
        if shed:
            shadow.release()
            return False
        try:
            future = self._pool.submit(self._run, shadow, query, primary, stats)
        except RuntimeError:  # the pool shut down between the check and the submit
            self._done(shadow, stats, dropped=True)
            return False
        future.add_done_callback(lambda f: f.cancelled() and self._done(shadow, stats, dropped=True))
        return True

    def _run(self, shadow: Lease, query: Query, primary: Answer, stats: _PairStats) -> None:
        try:
            answer = shadow.version.search(query)
        except Exception as exc:  # noqa: BLE001 - counted, logged, never raised to anyone
            with self._lock:
                stats.errors += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
            log.debug("shadow search on %s/%s failed: %s", shadow.version.index, shadow.version.version, exc)
            self._done(shadow, stats)
            return
        k = query.params.k
        overlap = overlap_at_k(primary.doc_ids, answer.doc_ids, k)
        rbo = rank_biased_overlap(primary.doc_ids[:k], answer.doc_ids[:k])
        with self._lock:
            stats.compared += 1
            stats.overlap_sum += overlap
            stats.rbo_sum += rbo
            stats.primary_ms.append(primary.total_ms)
            stats.shadow_ms.append(answer.total_ms)
        self._done(shadow, stats)

    def _done(self, shadow: Lease, stats: _PairStats, *, dropped: bool = False) -> None:
        shadow.release()
        with self._lock:
            self._pending -= 1
            if dropped:
                stats.dropped += 1

    @property
    def pending(self) -> int:
        return self._pending

    def stats(self, index: str | None = None) -> list[ShadowStats]:
        with self._lock:
            return [s.view(*key) for key, s in sorted(self._stats.items()) if index is None or key[0] == index]

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no shadow work is queued or running (tests, shutdown). False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)
        return self._pending == 0

    def close(self) -> None:
        """Stop taking work, cancel what waits, let what runs finish."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
