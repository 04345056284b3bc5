"""P4: what index-time token pooling costs in recall, and what it saves, on real text vectors.

    .venv/bin/python bench/bench_pooling.py [--docs 5000] [--factors 2,3] [--out bench/results/pooling.json]

Every document's token vectors are pooled with `colgrid_server.index._pooling.pool_patches`
(Ward clustering on cosine distance into ceil(n / factor) re-normalised means, the ColPali
authors' recipe) and published with `build_version_from_arrays`, next to the unpooled version
of the same vectors. Queries are held-out docstrings (first sentence), as bench_search.py
makes them. Reported per pool factor:

- tokens kept, bytes on disk, pooling and build time;
- `exhaustive recall@10`: exact MaxSim over every pooled document, against exact MaxSim over
  every unpooled document (the truth): what pooling alone costs;
- `recall@10`: the pooled version's default search (SearchParams()) against the same truth;
- latency of the default search, all versions interleaved per query.

Vectors (--source): `auto` reuses the vector files bench_codecs.py exported into bench/.work
(MiniLM embeddings of docstrings, held-out query vectors beside them); a directory in that
layout (tokens.npy, doc_offsets.npy, doc_ids.txt, queries.npy, query_offsets.npy) is used as
is. Versions are cached under <work-dir>/pooling/ (--rebuild rebuilds them).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from colgrid_server.index import build_version_from_arrays, load_vector_files, open_version, version_exists
from colgrid_server.index._pooling import pool_patches
from colgrid_server.search import SearchParams, Searcher

K = 10


def find_source(work: Path, docs: int) -> Path:
    """The smallest bench_codecs.py vector export holding at least `docs` documents."""
    found = []
    for path in work.glob("codecs/*/vectors"):
        if (path / "queries.npy").is_file() and (path / "doc_offsets.npy").is_file():
            found.append((np.load(path / "doc_offsets.npy").shape[0] - 1, str(path)))
    enough = sorted(f for f in found if f[0] >= docs)
    if not enough:
        sys.exit(f"no vector files with {docs} documents under {work}/codecs: run bench/bench_codecs.py first "
                 "(it exports bench_search.py's MiniLM embeddings), or pass --source DIR")
    return Path(enough[0][1])


def pool_corpus(tokens: np.ndarray, offsets: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    pooled, lengths = [], []
    for d in range(offsets.shape[0] - 1):  # index-time work, one clustering per document
        vectors = pool_patches(np.asarray(tokens[offsets[d] : offsets[d + 1]], dtype=np.float32), factor).vectors
        pooled.append(vectors)
        lengths.append(vectors.shape[0])
    return np.concatenate(pooled), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def ensure_version(path: Path, tokens: np.ndarray, offsets: np.ndarray, ids: list[str], params: dict[str, Any],
                   rebuild: bool) -> dict[str, Any]:
    record = path.with_suffix(".build.json")
    if version_exists(path) and record.is_file() and not rebuild:
        return {**json.loads(record.read_text()), "cached": True}
    shutil.rmtree(path, ignore_errors=True)
    started = time.perf_counter()
    summary = build_version_from_arrays(path, tokens=tokens, doc_offsets=offsets, doc_ids=ids, normalized=True,
                                        build_params=params)
    info = {"build_s": time.perf_counter() - started, "tokens": summary.tokens, "documents": summary.documents,
            "centroids": summary.centroids}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return {**info, "cached": False}


def top_ids(searcher: Searcher, query: np.ndarray, exhaustive: bool = False) -> list[str]:
    run = searcher.exhaustive if exhaustive else searcher.search
    return [h.doc_id for h in run(query, [""] * query.shape[0], SearchParams(k=K)).hits]


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--factors", default="2,3", help="comma-separated pool factors")
    p.add_argument("--source", default="auto", help="auto, or a directory of vector files with queries.npy")
    p.add_argument("--work-dir", type=Path, default=Path("bench/.work"))
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results/pooling.json"))
    args = p.parse_args(argv)
    factors = [int(f) for f in args.factors.split(",")]

    source = find_source(args.work_dir, args.docs) if args.source == "auto" else Path(args.source)
    files = load_vector_files(source)
    flat, query_offsets = np.load(source / "queries.npy"), np.load(source / "query_offsets.npy")
    queries = [np.ascontiguousarray(flat[query_offsets[i] : query_offsets[i + 1]], dtype=np.float32)
               for i in range(query_offsets.shape[0] - 1)]
    offsets = np.asarray(files.doc_offsets[: args.docs + 1], dtype=np.int64)
    tokens = np.asarray(files.tokens[: offsets[-1]])
    ids = list(files.doc_ids[: args.docs])
    key = hashlib.sha256(f"{source.resolve()}|{args.docs}".encode()).hexdigest()[:16]
    work = args.work_dir / "pooling" / f"{args.docs}docs-{key}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"{args.docs} documents, {tokens.shape[0]} tokens of dim {tokens.shape[1]}, {len(queries)} queries ({source})",
          file=sys.stderr)

    rows: dict[str, dict[str, Any]] = {}
    versions: dict[str, Path] = {}
    for factor in [1, *factors]:
        name = "unpooled" if factor == 1 else f"pool{factor}"
        started = time.perf_counter()
        if factor == 1:
            v_tokens, v_offsets, pool_s = tokens, offsets, 0.0
        else:
            v_tokens, v_offsets = pool_corpus(tokens, offsets, factor)
            pool_s = time.perf_counter() - started
        versions[name] = work / name
        build = ensure_version(versions[name], v_tokens, v_offsets, ids, {"pool_factor": factor}, args.rebuild)
        disk = sum(f.stat().st_size for f in versions[name].rglob("*") if f.is_file())
        rows[name] = {"pool_factor": factor, "tokens": int(v_offsets[-1]), "tokens_kept": int(v_offsets[-1]) / int(offsets[-1]),
                      "bytes_on_disk": disk, "pool_s": pool_s, **{f"build_{k}": v for k, v in build.items()}}
        print(f"  {name}: {rows[name]['tokens']} tokens ({rows[name]['tokens_kept']:.3f}), {disk / 2**20:.1f} MiB, "
              f"pooled in {pool_s:.0f} s, built in {build['build_s']:.0f} s{' (cached)' if build['cached'] else ''}",
              file=sys.stderr)

    searchers = {name: Searcher(open_version(path, device="cpu")) for name, path in versions.items()}
    truth = [top_ids(searchers["unpooled"], q, exhaustive=True) for q in queries]
    for name, searcher in searchers.items():
        rows[name]["exhaustive_recall_at_10"] = recall([top_ids(searcher, q, exhaustive=True) for q in queries], truth)
    seconds: dict[str, list[float]] = {name: [] for name in searchers}
    found: dict[str, list[list[str]]] = {name: [] for name in searchers}
    for name, searcher in searchers.items():
        top_ids(searcher, queries[0])  # warm-up
    for q in queries:  # interleaved: load from other processes falls on every version alike
        for name, searcher in searchers.items():
            started = time.perf_counter()
            found[name].append(top_ids(searcher, q))
            seconds[name].append(time.perf_counter() - started)
    for name in searchers:
        ms = np.asarray(seconds[name]) * 1e3
        rows[name].update({"recall_at_10": recall(found[name], truth), "p50_ms": float(np.median(ms)),
                           "mean_ms": float(ms.mean()), "qps": float(len(ms) / (ms.sum() / 1e3))})
        print(f"  {name}: exhaustive recall@10 {rows[name]['exhaustive_recall_at_10']:.3f}, "
              f"default search recall@10 {rows[name]['recall_at_10']:.3f}, p50 {rows[name]['p50_ms']:.1f} ms", file=sys.stderr)

    report = {"source": str(source), "documents": args.docs, "dim": int(tokens.shape[1]), "queries": len(queries),
              "k": K, "search_params": "SearchParams() defaults", "load_average": os.getloadavg(), "versions": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
