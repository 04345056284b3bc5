"""Load test: many concurrent SearchStream clients on loopback, mixed queries, for a fixed time.

    .venv/bin/python scripts/load_test.py --clients 64 --seconds 60 --out bench/results/load.json

Without --target it builds (once, cached under --work-dir) a demo-sized index of --docs stdlib
docstrings with the bundled encoder, starts `colgrid serve` on a free loopback port and stops
it at the end; with --target it loads a running server (--server-pid to read its memory).

Each client has its own channel and runs one stream after another, each of 1 to 50 queries sent
one at a time (the next once the previous is answered), drawn from held-out docstrings: short
(1-3 words), a first sentence, or a whole docstring; k from 1 to 100; explain on ~1 in 8;
nprobe/n_candidates overridden on ~1 in 10. Between queries, about 1 time in 50, the client
first sends a request the server must refuse (k over the limit, empty query, query too long,
unknown index) on its own one-query stream; these are counted apart, as expected errors.

Latency is per query: from handing the request to gRPC to receiving its answer. The first
--warmup seconds are not measured. Reported: QPS, latency percentiles (all, and by query kind),
errors (any failed good request; must be 0), expected errors by kind, versions that answered,
and the server's RSS when ready, at the start and end of the measured window, and its maximum.
Exit status 1 if any good request failed or any bad request was not refused as expected.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts._load_setup import BAD_REQUESTS, INDEX, UNKNOWN_INDEX, QueryPool, prepare_index, query_pool  # noqa: E402
from scripts._server import rss_bytes, start_server  # noqa: E402

MAX_STREAM_QUERIES = 50
BAD_SHARE = 0.02
MB = 1024 * 1024


@dataclass
class Tally:
    """Everything the clients observed inside the measured window."""

    latencies: list[float] = field(default_factory=list)
    by_kind: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    versions: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    expected_errors: Counter = field(default_factory=Counter)
    unexpected_bad: list[str] = field(default_factory=list)
    streams: int = 0


async def _stream(client, index: str, plan: list[tuple[str, dict]], routing_key: str, tally: Tally,
                  window: tuple[float, float], between) -> None:
    """One stream, closed loop: send a query, wait for its answer, `await between()`, send the
    next."""
    queue: asyncio.Queue = asyncio.Queue()
    sent: list[tuple[float, str]] = []

    async def requests():
        while (item := await queue.get()) is not None:
            sent.append((time.perf_counter(), item[0]))
            yield item[1]

    steps = iter(plan)
    await queue.put(next(steps))
    answered = 0
    async for result in client.search_stream(index, requests(), routing_key=routing_key, timeout=120):
        received = time.perf_counter()
        started, kind = sent[answered]
        answered += 1
        if window[0] <= started < window[1]:
            tally.latencies.append(received - started)
            tally.by_kind[kind].append(received - started)
            tally.versions[result.version] += 1
        if received < window[1]:
            await between()
        await queue.put(next(steps, None) if time.perf_counter() < window[1] else None)
    if answered != len(sent):
        raise RuntimeError(f"stream answered {answered} of {len(sent)} queries")


async def _bad(client, pool: QueryPool, rng: random.Random, tally: Tally, measured: bool) -> None:
    from colgrid_client import ColgridError

    kind = rng.choice(sorted(BAD_REQUESTS))
    override, expected = BAD_REQUESTS[kind]
    query = {"query": rng.choice(pool.short), **override}
    index = UNKNOWN_INDEX if kind == "unknown-index" else INDEX
    try:
        async for _ in client.search_stream(index, [query], timeout=60):
            pass
    except ColgridError as exc:
        if type(exc).__name__ == expected:
            if measured:
                tally.expected_errors[kind] += 1
            return
        tally.unexpected_bad.append(f"{kind}: expected {expected}, got {type(exc).__name__}: {exc}")
        return
    tally.unexpected_bad.append(f"{kind}: the server answered instead of refusing")


async def _client(number: int, target: str, index: str, pool: QueryPool, seed: int, tally: Tally,
                  window: tuple[float, float]) -> None:
    from colgrid_client import AsyncClient, ColgridError

    rng = random.Random(seed * 10_007 + number)
    async with AsyncClient(target, timeout=120, retries=0) as client:
        async def between() -> None:  # ~1 query in 50: a bad request instead, on its own stream
            if rng.random() < BAD_SHARE:
                await _bad(client, pool, rng, tally, window[0] <= time.perf_counter())

        while time.perf_counter() < window[1]:
            await between()
            plan = [pool.draw(rng) for _ in range(rng.randint(1, MAX_STREAM_QUERIES))]
            tally.streams += 1
            try:
                await _stream(client, index, plan, f"client-{number}-{tally.streams}", tally, window, between)
            except (ColgridError, RuntimeError) as exc:
                tally.errors.append(f"client {number}: {type(exc).__name__}: {exc}")


async def _sample_rss(pid: int | None, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    while pid is not None and not stop.is_set():
        try:
            samples.append((time.perf_counter(), rss_bytes(pid)))
        except (OSError, ProcessLookupError):
            return
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def run_load(target: str, *, index: str = INDEX, pool: QueryPool, clients: int, seconds: float,
                   warmup: float, server_pid: int | None = None, seed: int = 0) -> dict:
    """Drive `clients` streaming clients against `target`; the figures as a JSON-ready dict."""
    tally = Tally()
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    rss_ready = _rss(server_pid)
    began = time.perf_counter()
    window = (began + warmup, began + warmup + seconds)
    sampler = asyncio.create_task(_sample_rss(server_pid, samples, stop))
    await asyncio.sleep(0)
    results = await asyncio.gather(*(_client(i, target, index, pool, seed, tally, window) for i in range(clients)),
                                   return_exceptions=True)
    stop.set()
    await sampler
    tally.errors += [f"client crashed: {type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    measured = [(t, rss) for t, rss in samples if window[0] <= t <= window[1]] or samples
    return {
        "queries": len(tally.latencies),
        "qps": round(len(tally.latencies) / seconds, 1),
        "latency_ms": _percentiles(tally.latencies),
        "latency_ms_by_kind": {k: _percentiles(v) for k, v in sorted(tally.by_kind.items())},
        "errors": len(tally.errors),
        "error_samples": tally.errors[:10],
        "expected_errors": dict(sorted(tally.expected_errors.items())),
        "bad_requests_not_refused_as_expected": len(tally.unexpected_bad),
        "bad_request_samples": tally.unexpected_bad[:10],
        "streams": tally.streams,
        "versions_served": dict(tally.versions),
        "server_rss_mb": None if server_pid is None else {
            "ready": _mb(rss_ready),
            "start": _mb(measured[0][1]) if measured else None,
            "end": _mb(measured[-1][1]) if measured else None,
            "max": _mb(max(rss for _, rss in samples)) if samples else None,
            "samples_every_s": 1.0,
            "samples": [_mb(rss) for _, rss in samples],
        },
    }


def _rss(pid: int | None) -> int | None:
    try:
        return None if pid is None else rss_bytes(pid)
    except (OSError, ProcessLookupError):
        return None


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "mean": round(statistics.fmean(ordered) * 1000, 2), "p50": at(0.50),
            "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1] * 1000, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    parser.add_argument("--target", help="load this running server instead of starting one")
    parser.add_argument("--index", default=INDEX, help=f"index to search (default {INDEX})")
    parser.add_argument("--server-pid", type=int, help="with --target: the server's pid, to read its memory")
    parser.add_argument("--docs", type=int, default=5000, help="documents in the index built (default 5000, as the demo)")
    parser.add_argument("--encoder", type=Path, help="encoder dir for the index built (default: bundled MiniLM)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / ".work" / "load",
                        help="where the built index is cached (default bench/.work/load)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pool = query_pool(args.docs)
    server = None
    target, pid = args.target, args.server_pid
    if target is None:
        data_dir = prepare_index(args.work_dir, args.docs, args.encoder)
        log = args.work_dir / "logs" / f"server-{time.strftime('%Y%m%d-%H%M%S')}.log"
        server = start_server(data_dir, log, settings={"COLGRID_LOG_LEVEL": "WARNING"})
        target, pid = server.target, server.pid
        print(f"server pid {pid} on {target} (ready in {server.started_s:.1f}s; log {log})", flush=True)
    print(f"{args.clients} streaming clients for {args.seconds:g}s (+{args.warmup:g}s warm-up) on {target}",
          flush=True)
    load_before = os.getloadavg()
    try:
        results = asyncio.run(run_load(target, index=args.index, pool=pool, clients=args.clients,
                                       seconds=args.seconds, warmup=args.warmup, server_pid=pid, seed=args.seed))
        if server is not None and not server.alive():
            results["errors"] += 1
            results["error_samples"].append(f"the server exited (status {server.proc.returncode})")
    finally:
        if server is not None:
            server.stop()
    document = {
        "config": {"clients": args.clients, "seconds": args.seconds, "warmup_s": args.warmup, "index": args.index,
                   "docs": None if args.target else args.docs,
                   "encoder": str(args.encoder) if args.encoder else "bundled all-MiniLM-L6-v2",
                   "server": "external" if args.target else "started by the script", "seed": args.seed,
                   "max_stream_queries": MAX_STREAM_QUERIES, "bad_request_share": BAD_SHARE},
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    r = results
    rss = r["server_rss_mb"] or {}
    print(f"{r['queries']} queries in {args.seconds:g}s: {r['qps']} QPS, latency p50 {r['latency_ms'].get('p50')} ms, "
          f"p99 {r['latency_ms'].get('p99')} ms; {r['errors']} errors; expected errors {r['expected_errors']}; "
          f"server RSS {rss.get('start')} -> {rss.get('end')} MB (max {rss.get('max')})")
    for line in r["error_samples"] + r["bad_request_samples"]:
        print("  ", line)
    print(f"wrote {args.out}")
    ok = r["queries"] > 0 and r["errors"] == 0 and r["bad_requests_not_refused_as_expected"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
