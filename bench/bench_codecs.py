"""Codec benchmark: for each token codec (fp16, int8, residual4, residual2) built from the very
same embeddings, bytes per token, build time and peak memory, load time and resident bytes
(decoded at load and codes resident), recall@10 against the fp16 twin, and QPS. Not part of CI.

    .venv/bin/python bench/bench_codecs.py [--docs 5000] [--queries 100] [--out bench/results/codecs.json]

Embeddings (--source): `auto` (default) reuses the largest version bench_search.py cached under
--work-dir (real MiniLM embeddings of docstrings; queries are held-out standard-library
docstrings encoded by the same encoder), else a synthetic corpus; `synthetic` forces it; a
directory of vector files (load_vector_files' layout plus queries.npy and query_offsets.npy)
uses those. Builds go through build_version_from_arrays from memory-mapped .npy files, each in
a child process so that its peak RSS is its own. See bench/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from colgrid_server.index import (
    CODECS,
    LoadedVersion,
    build_version_from_arrays,
    load_vector_files,
    open_version,
    version_exists,
)
from colgrid_server.index.testing import SyntheticCorpus
from colgrid_server.search import SearchParams, Searcher

HERE = Path(__file__).resolve().parent
K = 10
ENTROPY_ARRAYS = ("entropy_bytes", "entropy_block_offsets", "entropy_unary_lengths", "entropy_rotation", "entropy_scales", "entropy_rice_k")
PAYLOAD_ARRAYS = {"fp16": ("tokens",), "int8": ("tokens_int8", "token_scales"), "residual4": ("residuals",),
                  "residual2": ("residuals",), "entropy4": ENTROPY_ARRAYS, "entropy2": ENTROPY_ARRAYS}  # fmt: skip
SINGLE_LAYOUT = ("fp16", "entropy4", "entropy2")  # entropy blocks decode only whole: always decoded at load
LAYOUTS = ("decoded", "codes")  # decoded at load into float16 / codes resident, decoded per query


# --- embeddings ------------------------------------------------------------------------------


def prepare_source(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any], Path]:
    """A directory of vector files (tokens.npy, doc_offsets.npy, doc_ids.txt, queries.npy,
    query_offsets.npy, source.json) holding the benchmark's documents and queries, and the
    work directory its versions are cached in."""
    if args.source not in ("auto", "synthetic"):
        source = Path(args.source)
        for name in ("queries.npy", "query_offsets.npy"):
            if not (source / name).is_file():
                sys.exit(f"{source} has no {name}: the benchmark needs query vectors beside the documents")
        files = load_vector_files(source)
        info = {"kind": "files", "path": str(source.resolve()), "normalized": bool(args.normalized),
                "documents": len(files.doc_ids), "tokens": int(files.tokens.shape[0]), "dim": int(files.tokens.shape[1]),
                "queries": int(np.load(source / "query_offsets.npy").shape[0] - 1)}  # fmt: skip
        return source, info, work / "codecs" / f"files-{digest([str(source.resolve())])}"
    cached = None if args.source == "synthetic" else largest_cached_version(work / "versions")
    if cached is None:
        key = digest(["synthetic", str(args.docs), str(args.queries), str(args.seed), str(args.dim)])
        target = work / "codecs" / f"synthetic-{key}" / "vectors"
        if not (target / "source.json").is_file():
            write_synthetic(target, args)
        return target, json.loads((target / "source.json").read_text()), target.parent
    version_dir, manifest = cached
    key = digest([manifest, str(args.docs), str(args.queries), str(args.seed)])
    target = work / "codecs" / f"{version_dir.name}-{key}" / "vectors"
    if not (target / "source.json").is_file():
        write_from_cached_version(target, version_dir, args, work)
    return target, json.loads((target / "source.json").read_text()), target.parent


def largest_cached_version(root: Path) -> tuple[Path, str] | None:
    """The cached bench_search version with the most documents (real embeddings), if any."""
    best = None
    for path in sorted(root.glob("*")) if root.is_dir() else []:
        if not version_exists(path):
            continue
        attrs = json.loads((path / "zarr.json").read_text())["attributes"]
        docs = attrs["counts"]["documents"]
        if attrs["encoder"]["kind"] != "external" and (best is None or docs > best[0]):
            best = (docs, path)
    if best is None:
        return None
    return best[1], hashlib.sha256((best[1] / "manifest.json").read_bytes()).hexdigest()


def write_from_cached_version(target: Path, version_dir: Path, args: argparse.Namespace, work: Path) -> None:
    from colgrid_server.corpus import iter_docstring_documents
    from colgrid_server.encoders import load_encoder

    log(f"exporting {args.docs} documents' embeddings from {version_dir}")
    version = open_version(version_dir, verify=False, device="cpu")
    n_docs = min(args.docs, version.documents)
    end = int(version.doc_offsets[n_docs])
    encoder = next((load_encoder(p) for p in sorted((work / "data" / "encoders").glob("*")) if p.is_dir()
                    and load_encoder(p).id == version.encoder.id), None)  # fmt: skip
    if encoder is None:
        sys.exit(f"no encoder with id {version.encoder.id} under {work / 'data' / 'encoders'}: rerun bench_search.py or use --source synthetic")
    indexed = set(version.doc_ids)  # held-out queries: not in the cached version at all
    texts = []
    for doc in iter_docstring_documents(include_private=False):
        if doc.id in indexed:
            continue
        sentence = " ".join(doc.text.split("\n\n", 1)[0].split())
        if 3 <= len(sentence.split()) <= 40:
            texts.append(sentence)
        if len(texts) == args.queries:
            break
    queries = [q.vectors for q in encoder.encode_queries(texts)]
    write_vectors(target, version.tokens[:end].numpy(), version.doc_offsets[: n_docs + 1], version.doc_ids[:n_docs], queries,
                  {"kind": "cached bench_search version (MiniLM embeddings of docstrings)", "version": str(version_dir),
                   "encoder": version.encoder.id, "normalized": version.normalized, "query_texts": texts})  # fmt: skip
    version.close()


def write_synthetic(target: Path, args: argparse.Namespace) -> None:
    log(f"writing a synthetic corpus of {args.docs} documents (dim {args.dim})")
    corpus = SyntheticCorpus(args.dim, topics=200, words=20000, noise=0.3, seed=args.seed)
    docs = corpus.documents(args.docs, min_tokens=10, max_tokens=200)
    rng = np.random.default_rng(args.seed + 1)
    queries = [corpus.vectors(int(n)) for n in rng.integers(4, 33, size=args.queries)]
    offsets = np.concatenate([[0], np.cumsum([d.vectors.shape[0] for d in docs])]).astype(np.int64)
    write_vectors(target, np.concatenate([d.vectors for d in docs]), offsets, [d.id for d in docs], queries,
                  {"kind": "synthetic (index.testing.SyntheticCorpus: topics=200, words=20000, noise=0.3)",
                   "normalized": True, "dim": args.dim})  # fmt: skip


def write_vectors(target: Path, tokens: np.ndarray, offsets: np.ndarray, ids: list[str], queries: list[np.ndarray], info: dict[str, Any]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "doc_offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "doc_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    np.save(tmp / "queries.npy", np.concatenate(queries).astype(np.float32))
    np.save(tmp / "query_offsets.npy", np.concatenate([[0], np.cumsum([q.shape[0] for q in queries])]).astype(np.int64))
    info = {**info, "documents": len(ids), "tokens": int(tokens.shape[0]), "dim": int(tokens.shape[1]), "queries": len(queries)}
    (tmp / "source.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)


def content_keys(source: Path) -> dict[str, str]:
    """Document id -> digest of its token vectors. The docstring corpus holds identical
    documents (one docstring in several modules): which of a tied group makes the top 10 is
    arbitrary, so duplicate-aware recall counts identical documents as one another."""
    tokens, offsets = np.load(source / "tokens.npy", mmap_mode="r"), np.load(source / "doc_offsets.npy")
    ids = (source / "doc_ids.txt").read_text(encoding="utf-8").splitlines()
    return {d: hashlib.sha256(np.ascontiguousarray(tokens[offsets[i] : offsets[i + 1]]).tobytes()).hexdigest()
            for i, d in enumerate(ids)}  # fmt: skip


def read_queries(source: Path) -> list[np.ndarray]:
    flat, offsets = np.load(source / "queries.npy"), np.load(source / "query_offsets.npy")
    return [np.ascontiguousarray(flat[offsets[i] : offsets[i + 1]], dtype=np.float32) for i in range(len(offsets) - 1)]


# --- building (child processes) --------------------------------------------------------------


def build_child(source: str, final_dir: str, codec: str, normalized: bool, threads: int | None, record_path: str) -> None:
    if threads:
        torch.set_num_threads(threads)
    files = load_vector_files(Path(source))
    started = time.perf_counter()
    summary = build_version_from_arrays(
        Path(final_dir), tokens=files.tokens, doc_offsets=files.doc_offsets, doc_ids=files.doc_ids,
        normalized=normalized, build_params={"codec": codec},
    )  # fmt: skip
    record = {"build_s": time.perf_counter() - started, "peak_rss_mb": process_peak_rss_mb(), "tokens": summary.tokens,
              "documents": summary.documents, "centroids": summary.centroids, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    Path(record_path).write_text(json.dumps(record, indent=1))


def ensure_built(source: Path, versions: Path, codec: str, normalized: bool, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    final_dir, record_path = versions / codec, versions / f"{codec}.build.json"
    if version_exists(final_dir) and record_path.is_file() and not args.rebuild:
        return final_dir, {**json.loads(record_path.read_text()), "cached": True}
    shutil.rmtree(final_dir, ignore_errors=True)
    log(f"building {codec}")
    child = multiprocessing.get_context("spawn").Process(
        target=build_child, args=(str(source), str(final_dir), codec, normalized, args.threads, str(record_path))
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"{codec} build failed (exit code {child.exitcode})")
    return final_dir, {**json.loads(record_path.read_text()), "cached": False}


# --- measuring -------------------------------------------------------------------------------


def storage(path: Path, codec: str, n_tokens: int) -> dict[str, Any]:
    """Logical bytes of the token payload (array shapes; the last chunk of each array is
    written whole, which adds up to 4 MB per array on disk) and what the files take."""
    group = zarr.open_group(str(path), mode="r")
    payload = sum(group[name].nbytes for name in PAYLOAD_ARRAYS[codec])
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"payload_bytes_per_token": payload / n_tokens, "token_codes_bytes_per_token": group["token_codes"].nbytes / n_tokens,
            "bytes_on_disk": total, "disk_bytes_per_token": total / n_tokens}  # fmt: skip


def load(path: Path, keep_codes: bool) -> tuple[LoadedVersion, dict[str, Any]]:
    started = time.perf_counter()
    version = open_version(path, verify=True, device="cpu", keep_codes=keep_codes)
    return version, {"load_s": time.perf_counter() - started, "resident_bytes": version.nbytes,
                     "token_store_bytes": version.store.nbytes, "token_store": type(version.store).__name__}  # fmt: skip


def top_ids(searcher: Searcher, query: np.ndarray, exhaustive: bool = False) -> list[str]:
    run = searcher.exhaustive if exhaustive else searcher.search
    return [h.doc_id for h in run(query, [""] * query.shape[0], SearchParams(k=K)).hits]


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean(per_query_recall(found, truth)))


def per_query_recall(found: list[list[str]], truth: list[list[str]], keys: dict[str, str] | None = None) -> np.ndarray:
    """Recall per query; with keys (content_keys), identical documents count as one another."""
    if keys is None:
        return np.array([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
    return np.array([sum((Counter(keys[d] for d in f) & Counter(keys[d] for d in t)).values()) / len(t) for f, t in zip(found, truth)])


def loss_with_error(reference: np.ndarray, codec: np.ndarray, resamples: int = 2000) -> dict[str, float]:
    """Mean recall loss (reference - codec, paired per query) and its bootstrap standard error
    over queries: over 100-200 queries it is near 0.003, as large as the losses compared."""
    diff = reference - codec
    draws = np.random.default_rng(0).integers(0, diff.shape[0], (resamples, diff.shape[0]))
    return {"loss": float(diff.mean()), "loss_se": float(diff[draws].mean(axis=1).std())}


def timed_searches(searchers: dict[str, Searcher], queries: list[np.ndarray], repeats: int) -> dict[str, dict[str, Any]]:
    """Every setting on every query, interleaved per query so that load from other processes
    falls on all settings alike; the first pass also collects the hits."""
    seconds: dict[str, list[float]] = {name: [] for name in searchers}
    hits: dict[str, list[list[str]]] = {name: [] for name in searchers}
    for name, searcher in searchers.items():  # warm-up: one query each
        top_ids(searcher, queries[0])
    for rep in range(repeats):
        for q in queries:
            for name, searcher in searchers.items():
                started = time.perf_counter()
                ids = top_ids(searcher, q)
                seconds[name].append(time.perf_counter() - started)
                if rep == 0:
                    hits[name].append(ids)
    out = {}
    for name, values in seconds.items():
        ms = np.asarray(values) * 1e3
        out[name] = {"hits": hits[name], "mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
                     "p99_ms": float(np.percentile(ms, 99)), "qps": float(len(ms) / (ms.sum() / 1e3))}  # fmt: skip
    return out


# --- report ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    s, m = report["source"], report["machine"]
    print(f"\ncolgrid codec benchmark — {s['documents']:,} documents, {s['tokens']:,} tokens of dim {s['dim']} "
          f"({s['kind']}), {s['queries']} queries, {m['cpu']} × {m['cpu_count']}, load {m['load_average_at_start'][0]:.1f}")  # fmt: skip
    fp16 = report["codecs"]["fp16"]["storage"]["payload_bytes_per_token"]
    header = ("codec", "layout", "B/tok", "vs fp16", "disk B/tok", "build s", "build RSS MB", "load s", "resident MB",
              "recall@10", "loss ± se", "dup-aware loss", "exh. recall@10", "QPS", "p50 ms")  # fmt: skip
    rows = []
    for codec, r in report["codecs"].items():
        st = r["storage"]
        for layout, lr in r["layouts"].items():
            rows.append((codec, layout, f"{st['payload_bytes_per_token']:.1f}", f"{st['payload_bytes_per_token'] / fp16:.3f}",
                         f"{st['disk_bytes_per_token']:.1f}", f"{r['build']['build_s']:.1f}", f"{r['build']['peak_rss_mb']:.0f}",
                         f"{lr['load_s']:.2f}", f"{lr['resident_bytes'] / 2**20:.0f}", f"{lr['recall_at_10']:.4f}",
                         _loss(lr.get("recall_loss_vs_fp16")), _loss(lr.get("recall_loss_vs_fp16_duplicate_aware")),
                         f"{r['exhaustive_recall_at_10']:.4f}", f"{lr.get('qps', float('nan')):.1f}",
                         f"{lr.get('p50_ms', float('nan')):.1f}"))  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    print("\nB/tok: token payload per token (token_codes, 2 B/token, come with every codec). recall@10: default search "
          "against the fp16 twin's exhaustive top-10; loss: fp16's minus the codec's, paired per query, with its "
          "bootstrap standard error over queries (dup-aware: identical documents count as one another); exh.: the "
          "codec's exhaustive top-10 against it.")  # fmt: skip


def _loss(figure: dict[str, float] | None) -> str:
    return "" if figure is None else f"{figure['loss']:.4f} ± {figure['loss_se']:.4f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work_dir.resolve()
    report: dict[str, Any] = {"machine": machine(), "code": code_version(), "config": {k: str(v) for k, v in vars(args).items()}}
    source, info, cache = prepare_source(args, work)
    report["source"] = {k: v for k, v in info.items() if k != "query_texts"}
    queries = read_queries(source)
    versions = cache / "versions"
    codecs = ["fp16", *[c for c in args.codecs if c != "fp16"]]  # fp16 is the reference twin
    built = {c: ensure_built(source, versions, c, bool(info["normalized"]), args) for c in codecs}

    log("exhaustive top-10 on the fp16 twin (ground truth)")
    fp16_version, _ = load(built["fp16"][0], keep_codes=False)
    truth = [top_ids(Searcher(fp16_version), q, exhaustive=True) for q in queries]
    fp16_version.close()

    report["codecs"] = {}
    searchers: dict[str, Searcher] = {}
    per_query: dict[str, np.ndarray] = {}  # recall@10 per query of each codec/layout (and /exhaustive)
    found: dict[str, list[list[str]]] = {}  # top-10 ids per query of each codec/layout (and /exhaustive)
    keys = content_keys(source)
    for codec in codecs:
        path, build = built[codec]
        entry: dict[str, Any] = {"build": build, "storage": storage(path, codec, build["tokens"]), "layouts": {}}
        for layout in LAYOUTS if codec not in SINGLE_LAYOUT else ("decoded",):
            version, figures = load(path, keep_codes=layout == "codes")
            searcher = Searcher(version)
            if layout == "decoded":
                log(f"exhaustive top-10 on {codec}")
                found[f"{codec}/exhaustive"] = [top_ids(searcher, q, exhaustive=True) for q in queries]
                per_query[f"{codec}/exhaustive"] = per_query_recall(found[f"{codec}/exhaustive"], truth)
                entry["exhaustive_recall_at_10"] = float(per_query[f"{codec}/exhaustive"].mean())
            found[f"{codec}/{layout}"] = [top_ids(searcher, q) for q in queries]
            per_query[f"{codec}/{layout}"] = per_query_recall(found[f"{codec}/{layout}"], truth)
            figures["recall_at_10"] = float(per_query[f"{codec}/{layout}"].mean())
            if codec != "fp16":
                figures["recall_loss_vs_fp16"] = loss_with_error(per_query["fp16/decoded"], per_query[f"{codec}/{layout}"])
                figures["recall_loss_vs_fp16_duplicate_aware"] = loss_with_error(
                    per_query_recall(found["fp16/decoded"], truth, keys), per_query_recall(found[f"{codec}/{layout}"], truth, keys))
                if layout == "decoded":
                    entry["exhaustive_recall_loss"] = loss_with_error(per_query["fp16/exhaustive"], per_query[f"{codec}/exhaustive"])
            entry["layouts"][layout] = figures
            # A compressed version decoded at load searches exactly like fp16 (same layout and
            # kernel): timing it is optional, and holding every decoded copy costs memory.
            if codec == "fp16" or layout == "codes" or args.time_decoded:
                searchers[f"{codec}/{layout}"] = searcher
            else:
                version.close()
        report["codecs"][codec] = entry

    log(f"searching: {len(searchers)} settings x {len(queries)} queries x {args.repeats} passes")
    timings = timed_searches(searchers, queries, args.repeats)
    for name, t in timings.items():
        codec, layout = name.split("/")
        hits = t.pop("hits")
        assert recall(hits, truth) == report["codecs"][codec]["layouts"][layout]["recall_at_10"]
        report["codecs"][codec]["layouts"][layout].update(t)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["peak_rss_mb"] = peak_rss_mb()
    atomic_write(args.out, json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwritten to {args.out}")
    return report


# --- plumbing (as in bench_search.py) --------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="auto", help="auto | synthetic | a directory of vector files with queries.npy")
    p.add_argument("--docs", type=int, default=5000, help="documents (first N of the cached version, or synthetic)")
    p.add_argument("--queries", type=int, default=100, help="held-out queries (a --source directory brings its own)")
    p.add_argument("--codecs", type=lambda s: [c for c in s.split(",") if c], default=list(CODECS))
    p.add_argument("--dim", type=int, default=128, help="synthetic corpus only")
    p.add_argument("--normalized", action="store_true", help="with a --source directory: its vectors are unit length")
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the queries")
    p.add_argument("--no-time-decoded", dest="time_decoded", action="store_false",
                   help="time only fp16 and the codes-resident layouts (less memory for large corpora)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the builds (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached versions")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work")
    p.add_argument("--out", type=Path, default=HERE / "results" / "codecs.json")
    args = p.parse_args(argv)
    if unknown := set(args.codecs) - set(CODECS):
        p.error(f"unknown codecs {sorted(unknown)}; choose from {', '.join(CODECS)}")
    return args


def digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mb() -> float:
    """This process's own peak RSS: /proc's VmHWM restarts at exec, whereas getrusage's
    ru_maxrss in a spawned child starts from its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mb()


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (peak RSS {peak_rss_mb():.0f} MB)", file=sys.stderr, flush=True)


def code_version() -> dict[str, Any]:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=HERE.parent, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "server_code_modified": bool(git("status", "--porcelain", "--", "server"))}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if cpuinfo.exists() else platform.processor()  # fmt: skip
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "ONEDNN_", "DNNL_", "MALLOC_"))},
    }


if __name__ == "__main__":
    main()
