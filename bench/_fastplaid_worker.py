"""fast-plaid side of bench_fastplaid.py, run with the separate virtualenv's python (fast-plaid
pins its own torch, which the colgrid venv cannot share). Imports nothing from colgrid.

    python _fastplaid_worker.py build --vectors DIR --index DIR --nbits 4 [--max-points-per-centroid 256] --threads 2 --record FILE
    python _fastplaid_worker.py serve --vectors DIR --index DIR [--index DIR ...] --threads 1

`build` indexes vectors/tokens.npy (float16, split by doc_offsets.npy) with FastPlaid.create and
its default build knobs but nbits and the k-means sample, and writes the build figures to --record. `serve` loads the indexes and
answers one JSON request per stdin line with one JSON line on stdout:

    {"op": "search", "query": i, "settings": [[name, n_ivf_probe, n_full_scores], ...]}
        -> {"results": [{"ids": [...], "seconds": s}, ...]}   (one query, each setting in order)
    {"op": "threads", "n": 2}  -> {"threads": 2}
    {"op": "quit"}

The timed span is the public FastPlaid.search call alone, one query, n_processes=1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, which starts afresh at exec. ru_maxrss does not: a
    child started by fork + exec reports at least its parent's peak at the fork. (The same as
    bench_search.peak_rss_mb, repeated: this worker runs in fast-plaid's venv, which has no
    colgrid_server for bench_search to import.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to
    other jobs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def set_threads(n: int) -> None:
    # Intra-op threads for libtorch (fast-plaid's kernels are libtorch ops); rayon reads its
    # variable once, so the parent also sets RAYON_NUM_THREADS before starting this process.
    torch.set_num_threads(n)


def build(args: argparse.Namespace) -> None:
    from fast_plaid import search

    set_threads(args.threads)
    vectors = Path(args.vectors)
    tokens = torch.from_numpy(np.load(vectors / "tokens.npy"))
    offsets = np.load(vectors / "doc_offsets.npy")
    docs = [tokens[int(s):int(e)] for s, e in zip(offsets[:-1], offsets[1:])]
    index = Path(args.index)
    load_before = list(os.getloadavg())
    started, cpu_started = time.perf_counter(), cpu_seconds()
    fp = search.FastPlaid(index=str(index), device="cpu")
    fp.create(documents_embeddings=docs, nbits=args.nbits, max_points_per_centroid=args.max_points_per_centroid)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    meta = json.loads((index / "metadata.json").read_text())
    record = {
        "nbits": args.nbits,
        "max_points_per_centroid": args.max_points_per_centroid,
        "documents": len(docs),
        "tokens": int(tokens.shape[0]),
        "build_s": seconds,
        "build_cpu_s": cpu,
        "threads": args.threads,
        "load_average_at_start": load_before,
        "load_average_at_end": list(os.getloadavg()),
        "bytes_on_disk": bytes_on_disk(index),
        "peak_rss_mb": peak_rss_mb(),
        "metadata": meta,
        "knobs": "FastPlaid.create defaults (kmeans_niters=4, seed=42) but nbits and max_points_per_centroid (default 256)",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.record).write_text(json.dumps(record, indent=2))


def load_queries(vectors: Path) -> list[torch.Tensor]:
    flat = np.load(vectors / "queries.npy")
    offsets = np.load(vectors / "query_offsets.npy")
    return [torch.from_numpy(np.ascontiguousarray(flat[s:e])).to(torch.float16) for s, e in zip(offsets[:-1], offsets[1:])]


def serve(args: argparse.Namespace) -> None:
    from fast_plaid import search

    set_threads(args.threads)
    queries = load_queries(Path(args.vectors))
    indexes: dict[str, Any] = {}
    loads: dict[str, float] = {}
    for path in args.index:
        started = time.perf_counter()
        fp = search.FastPlaid(index=path, device="cpu")
        fp.search(queries_embeddings=queries[0], top_k=10, show_progress=False, n_processes=1)  # loads lazily
        loads[Path(path).name] = time.perf_counter() - started
        indexes[Path(path).name] = fp
    reply({"ready": True, "load_s": loads, "torch": torch.__version__, "fast_plaid": _version(),
           "threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "threads":
            set_threads(int(request["n"]))
            reply({"threads": torch.get_num_threads()})
            continue
        query = queries[int(request["query"])]
        results = []
        for name, probe, full in request["settings"]:
            fp = indexes[name]
            started = time.perf_counter()
            hits = fp.search(queries_embeddings=query, top_k=int(request.get("k", 10)), n_ivf_probe=int(probe),
                             n_full_scores=int(full), show_progress=False, n_processes=1)[0]
            seconds = time.perf_counter() - started
            results.append({"ids": [int(doc) for doc, _ in hits], "seconds": seconds})
        reply({"results": results, "peak_rss_mb": peak_rss_mb()})


def _version() -> str:
    from importlib.metadata import version

    return version("fast-plaid")


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--vectors", required=True)
    b.add_argument("--index", required=True)
    b.add_argument("--nbits", type=int, default=4)
    b.add_argument("--max-points-per-centroid", type=int, default=256, help="k-means sample: at most this many tokens per centroid")
    b.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    b.add_argument("--record", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--vectors", required=True)
    s.add_argument("--index", action="append", required=True)
    s.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    build(args) if args.command == "build" else serve(args)


if __name__ == "__main__":
    main()
