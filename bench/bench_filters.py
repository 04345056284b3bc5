"""Filtered search on real text: latency and recall@k against exhaustive exact MaxSim over the
permitted documents, for filters from ~50% of the corpus down to a handful of documents, next
to the same queries unfiltered. Not part of CI.

    .venv/bin/python bench/bench_filters.py [--docs 20000] [--queries 200] [--out bench/results/filters.json]

Uses bench_search.py's cached corpus split and version (its documents carry metadata: module,
kind, source, line); filters are picked by how many documents they permit. Each setting runs
on every query, interleaved per query, one thread per search. The first filtered search on a
field pays for indexing that field (reported separately as `index_field_ms`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as bs  # noqa: E402  (the corpus and version it caches)

from colgrid_server.encoders import ensure_default_encoder, load_encoder  # noqa: E402
from colgrid_server.index import open_version  # noqa: E402
from colgrid_server.search import SearchParams, Searcher, parse_filter  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGET_SHARES = (0.5, 0.1, 0.03, 0.01, 0.001)


def pick_filters(version: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, filter) pairs permitting about each TARGET_SHARES of the documents: the most common
    kind, then the largest modules added until the share is reached."""
    metas = [json.loads(m) for m in version.metadata_json]
    n = len(metas)
    kinds = Counter(m.get("kind") for m in metas)
    modules = Counter(m.get("module") for m in metas if m.get("module"))
    out: list[tuple[str, dict[str, Any]]] = []
    kind, count = kinds.most_common(1)[0]
    out.append((f"kind={kind} ({count / n:.0%})", {"kind": kind}))
    ordered = [m for m, _ in sorted(modules.items(), key=lambda item: (-item[1], item[0]))]
    for share in TARGET_SHARES[1:]:
        chosen, total = [], 0
        for module in ordered:  # the smallest modules that together reach the share, from the large end down
            if modules[module] > share * n and chosen == [] and module != ordered[-1]:
                continue
            chosen.append(module)
            total += modules[module]
            if total >= share * n:
                break
        out.append((f"{len(chosen)} module(s) ({total / n:.1%})", {"module": chosen}))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=HERE / ".work")
    p.add_argument("--out", type=Path, default=HERE / "results" / "filters.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work_dir.resolve()
    docs, queries, _ = bs.cached_corpus(work, args.docs, args.queries, args.seed, False)
    encoder_dir = ensure_default_encoder(work / "data")
    encoder = load_encoder(encoder_dir, threads=1)
    build_args = argparse.Namespace(batch_size=64, threads=None, rebuild=False, docs=args.docs)
    version_dir, _ = bs.ensure_version(docs, work, encoder, encoder_dir, build_args)
    version = open_version(version_dir, verify=False, device="cpu")
    encoded = encoder.encode_queries([q.text for q in queries])
    searcher = Searcher(version, threads=1)
    params = SearchParams(k=args.k)
    filters = pick_filters(version)
    bs.log(f"{version.documents} documents, {len(encoded)} queries; filters: {[name for name, _ in filters]}")

    settings: dict[str, Any] = {"unfiltered": None}
    index_ms: dict[str, float] = {}
    for name, spec in filters:
        where = parse_filter(spec)
        started = time.perf_counter()
        permitted = int(searcher.filters.mask(where).sum())  # indexes the field once
        index_ms[name] = (time.perf_counter() - started) * 1e3
        settings[name] = (where, permitted)
    truth = {name: [[h.doc_id for h in searcher.exhaustive(q.vectors, q.tokens, params, where=s[0] if s else None).hits]
                    for q in encoded] for name, s in settings.items()}
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    recall: dict[str, list[float]] = {name: [] for name in settings}
    scored: dict[str, list[int]] = {name: [] for name in settings}
    for i, q in enumerate(encoded):
        for name, s in settings.items():
            started = time.perf_counter()
            result = searcher.search(q.vectors, q.tokens, params, where=s[0] if s else None)
            seconds[name].append(time.perf_counter() - started)
            want = set(truth[name][i])
            recall[name].append(len({h.doc_id for h in result.hits} & want) / max(1, len(want)))
            scored[name].append(result.stats.candidates)
    rows = []
    for name, s in settings.items():
        rows.append({"filter": name, "permitted": version.documents if s is None else s[1],
                     "index_field_ms": index_ms.get(name), f"recall_at_{args.k}": float(np.mean(recall[name])),
                     "scored_mean": float(np.mean(scored[name])), **bs.latency_figures(seconds[name])})
    report = {"machine": bs.machine(), "code": bs.code_version(), "documents": version.documents,
              "queries": len(encoded), "k": args.k, "nprobe": params.nprobe, "n_candidates": params.n_candidates,
              "rows": rows, "load_average_at_end": list(os.getloadavg())}
    bs.atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print(f"\n{version.documents:,} documents, {len(encoded)} queries, k={args.k}, defaults nprobe={params.nprobe} "
          f"n_candidates={params.n_candidates}, 1 thread\n")
    print("| filter | permitted | recall@10 vs filtered exhaustive | scored | mean ms | p99 ms | QPS | field index ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        idx = "" if r["index_field_ms"] is None else f"{r['index_field_ms']:.0f}"
        print(f"| {r['filter']} | {r['permitted']:,} | {r[f'recall_at_{args.k}']:.3f} | {r['scored_mean']:.0f} | "
              f"{r['mean_ms']:.1f} | {r['p99_ms']:.1f} | {r['qps']:.1f} | {idx} |")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
