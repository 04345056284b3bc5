"""P1: colgrid against fast-plaid (LightOn's PLAID) on the very same token embeddings: recall@10
against exhaustive exact MaxSim vs queries per second for every knob setting of each system,
plus exhaustive search itself; index build time and bytes on disk of each. Not part of CI.

    .venv/bin/python bench/bench_fastplaid.py [--docs 20000] [--limit-queries 100] [--out bench/results/fastplaid.json]

fast-plaid pins its own torch, so it runs in a separate virtualenv (created here on first use,
--venv) as a child process (_fastplaid_worker.py). The corpus, the colgrid version (its fp16
tokens are the embeddings both systems index), the queries and the exhaustive ground truth are
bench_search.py's, cached under --work-dir; the embeddings are exported once as .npy for
fast-plaid. Settings of both systems are interleaved per query (the two processes take turns,
never run at once), one query per call, single process, the same torch thread count. See
bench/README.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")  # bench/README.md "Memory on CPU"

import argparse
import json
import multiprocessing
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_search as bs  # noqa: E402  (the corpus, version and ground truth it caches)

from colgrid_server.encoders import ensure_default_encoder, load_encoder  # noqa: E402
from colgrid_server.index import LoadedVersion, build_version_from_arrays, open_version, version_exists  # noqa: E402
from colgrid_server.search import SearchParams, Searcher  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_fastplaid_worker.py"
TARGET_RECALL = 0.95
FP_DEFAULT_POINTS_PER_CENTROID = 256  # FastPlaid.create's max_points_per_centroid


# --- fast-plaid's virtualenv and index ------------------------------------------------------


def ensure_venv(venv: Path, fast_plaid: str, torch_version: str, python: str) -> dict[str, str]:
    """A virtualenv holding fast-plaid and the torch release it is built against. On Linux x86_64
    PyPI serves only CUDA builds of torch: they run on the CPU (about 4.8 GB installed)."""
    py = venv / "bin" / "python"
    if not py.exists():
        bs.log(f"creating {venv} ({python} -m venv)")
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    wanted = {"fast-plaid": fast_plaid, "torch": torch_version}
    if installed_versions(py) != wanted:
        bs.log(f"installing fast-plaid=={fast_plaid} torch=={torch_version} into {venv}")
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch_version}", f"fast-plaid=={fast_plaid}"], check=True)
    got = installed_versions(py)
    if got != wanted:
        sys.exit(f"{venv} holds {got}, not {wanted}")
    return got


def installed_versions(py: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json\nout = {}\nfor n in ('fast-plaid', 'torch'):\n"
            "    try: out[n] = m.version(n).split('+')[0]\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    run = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(run.stdout) if run.returncode == 0 else {}


def export_vectors(target: Path, version: LoadedVersion, queries: list[np.ndarray]) -> Path:
    """The version's fp16 token matrix, its document offsets and ids, and the query matrices, as
    .npy (load_vector_files' layout): what both systems index."""
    if not (target / "source.json").is_file():
        bs.log(f"exporting {version.tokens_count:,} token vectors to {target}")
        target.mkdir(parents=True, exist_ok=True)
        np.save(target / "tokens.npy", version.tokens.numpy())
        np.save(target / "doc_offsets.npy", version.doc_offsets.astype(np.int64))
        np.save(target / "queries.npy", np.concatenate(queries).astype(np.float32))
        np.save(target / "query_offsets.npy", np.concatenate([[0], np.cumsum([q.shape[0] for q in queries])]).astype(np.int64))
        bs.atomic_write(target / "source.json", json.dumps({"version": str(version.path), "manifest_sha256": version.manifest_sha256,
                                                            "normalized": version.normalized}))  # fmt: skip
    if not (target / "doc_ids.txt").is_file():
        bs.atomic_write(target / "doc_ids.txt", "\n".join(version.doc_ids) + "\n")
    return target


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def colgrid_build_child(vectors: str, final_dir: str, threads: int, record_path: str) -> None:
    torch.set_num_threads(threads)
    source = json.loads((Path(vectors) / "source.json").read_text())
    tokens = np.load(Path(vectors) / "tokens.npy", mmap_mode="r")
    offsets = np.load(Path(vectors) / "doc_offsets.npy")
    ids = (Path(vectors) / "doc_ids.txt").read_text(encoding="utf-8").splitlines()
    load_before = list(os.getloadavg())
    started, cpu_started = time.perf_counter(), cpu_seconds()
    summary = build_version_from_arrays(Path(final_dir), tokens=tokens, doc_offsets=offsets, doc_ids=ids,
                                        normalized=bool(source.get("normalized", True)))  # fmt: skip
    record = {"documents": summary.documents, "tokens": summary.tokens, "centroids": summary.centroids,
              "build_s": time.perf_counter() - started, "build_cpu_s": cpu_seconds() - cpu_started, "threads": threads,
              "peak_rss_mb": bs.peak_rss_mb(), "load_average_at_start": load_before, "load_average_at_end": list(os.getloadavg()),
              "knobs": "build_version_from_arrays defaults (fp16 tokens)", "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    Path(record_path).write_text(json.dumps(record, indent=2))


def ensure_colgrid_index(vectors: Path, root: Path, threads: int, rebuild: bool) -> tuple[Path, dict[str, Any]]:
    """colgrid's version of the exported arrays (no texts: like fast-plaid's index, vectors only),
    built in a child process so that its peak RSS and CPU time are its own."""
    final_dir, record = root / "colgrid-fp16", root / "colgrid-fp16.build.json"
    if version_exists(final_dir) and record.is_file() and not rebuild:
        return final_dir, {**json.loads(record.read_text()), "cached": True}
    shutil.rmtree(final_dir, ignore_errors=True)
    bs.log(f"colgrid: building {final_dir} ({threads} threads)")
    child = multiprocessing.get_context("spawn").Process(target=colgrid_build_child, args=(str(vectors), str(final_dir), threads, str(record)))
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"colgrid build failed (exit code {child.exitcode})")
    return final_dir, {**json.loads(record.read_text()), "cached": False}


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def ensure_fastplaid_index(py: Path, vectors: Path, root: Path, nbits: int, points: int, threads: int,
                           rebuild: bool) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    name = f"nbits{nbits}" + ("" if points == FP_DEFAULT_POINTS_PER_CENTROID else f"-kmeans{points}")
    index, record = root / name, root / f"{name}.build.json"
    if record.is_file() and (index / "metadata.json").is_file() and not rebuild:
        return index, {**json.loads(record.read_text()), "cached": True}
    shutil.rmtree(index, ignore_errors=True)
    bs.log(f"fast-plaid: building {index} (nbits={nbits}, {threads} threads)")
    subprocess.run([str(py), str(WORKER), "build", "--vectors", str(vectors), "--index", str(index), "--nbits", str(nbits),
                    "--max-points-per-centroid", str(points), "--threads", str(threads), "--record", str(record)],
                   check=True, env=worker_env(threads))  # fmt: skip
    return index, {**json.loads(record.read_text()), "cached": False}


class Worker:
    """The fast-plaid serving process: one JSON request per line, one JSON reply per line."""

    def __init__(self, py: Path, vectors: Path, indexes: Sequence[Path], threads: int) -> None:
        argv = [str(py), str(WORKER), "serve", "--vectors", str(vectors), "--threads", str(threads)]
        for index in indexes:
            argv += ["--index", str(index)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env(threads))
        self.ready = self._read()

    def search(self, query: int, settings: list[tuple[str, int, int]], k: int) -> dict[str, Any]:
        return self.call({"op": "search", "query": query, "settings": settings, "k": k})

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the fast-plaid worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --- the sweep -------------------------------------------------------------------------------


def sweep(searcher: Searcher, worker: Worker, encoded: list[Any], truth: list[list[str]], doc_ids: list[str], k: int,
          colgrid: list[tuple[int, int]], fastplaid: list[tuple[str, int, int]], exhaustive: bool,
          warmup: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every setting of both systems on every query. The systems take turns per query (which
    goes first alternates), so load from other processes falls on both alike; only one of the
    two processes works at any moment."""
    settings = [SearchParams(k=k, nprobe=p, n_candidates=c) for p, c in colgrid]
    keys: list[tuple[str, ...]] = [("colgrid", str(p), str(c)) for p, c in colgrid]
    keys += [("fast-plaid", name, str(probe), str(full)) for name, probe, full in fastplaid]
    if exhaustive:
        keys.append(("exhaustive",))
    seconds: dict[tuple[str, ...], list[float]] = {key: [] for key in keys}
    recalls: dict[tuple[str, ...], list[float]] = {key: [] for key in keys}
    for i in range(min(warmup, len(encoded))):
        for params in settings:
            searcher.search(encoded[i].vectors, encoded[i].tokens, params)
        worker.search(i, fastplaid, k)

    def run_colgrid(i: int) -> None:
        q, exact = encoded[i], set(truth[i])
        for key, params in zip(keys, settings):
            started = time.perf_counter()
            result = searcher.search(q.vectors, q.tokens, params)
            seconds[key].append(time.perf_counter() - started)
            recalls[key].append(len({h.doc_id for h in result.hits} & exact) / k)
        if exhaustive:
            started = time.perf_counter()
            result = searcher.exhaustive(q.vectors, q.tokens, SearchParams(k=k))
            seconds[("exhaustive",)].append(time.perf_counter() - started)
            recalls[("exhaustive",)].append(len({h.doc_id for h in result.hits} & exact) / k)

    def run_fastplaid(i: int) -> None:
        exact = set(truth[i])
        reply = worker.search(i, fastplaid, k)
        for key, r in zip(keys[len(settings):], reply["results"]):
            seconds[key].append(r["seconds"])
            recalls[key].append(len({doc_ids[d] for d in r["ids"]} & exact) / k)

    for i in range(len(encoded)):
        for run in ((run_colgrid, run_fastplaid) if i % 2 == 0 else (run_fastplaid, run_colgrid)):
            run(i)
        if (i + 1) % 10 == 0:
            bs.log(f"  sweep {i + 1}/{len(encoded)} queries")
    rows = []
    for key in keys:
        row: dict[str, Any] = {"system": key[0]}
        if key[0] == "colgrid":
            row.update(nprobe=int(key[1]), n_candidates=int(key[2]))
        elif key[0] == "fast-plaid":
            row.update(index=key[1], n_ivf_probe=int(key[2]), n_full_scores=int(key[3]))
        row[f"recall_at_{k}"] = float(np.mean(recalls[key]))
        row.update(bs.latency_figures(seconds[key]))
        rows.append(row)
    return rows


def frontier(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The Pareto-optimal rows (no other row has both more QPS and at least the same recall),
    by falling QPS."""
    ordered = sorted(rows, key=lambda r: (-r["qps"], -r[f"recall_at_{k}"]))
    out, best = [], -1.0
    for r in ordered:
        if r[f"recall_at_{k}"] > best:
            out.append(r)
            best = r[f"recall_at_{k}"]
    return out


def best_at(rows: list[dict[str, Any]], k: int, target: float) -> dict[str, Any] | None:
    """The fastest setting whose recall@k reaches the target: the first operating point at it."""
    ok = [r for r in rows if r[f"recall_at_{k}"] >= target]
    return max(ok, key=lambda r: r["qps"]) if ok else None


def label(row: dict[str, Any]) -> str:
    if row["system"] == "colgrid":
        return f"colgrid nprobe={row['nprobe']} n_candidates={row['n_candidates']}"
    if row["system"] == "fast-plaid":
        return f"fast-plaid {row['index']} n_ivf_probe={row['n_ivf_probe']} n_full_scores={row['n_full_scores']}"
    return "exhaustive"


# --- output ----------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], k: int) -> str:
    lines = []
    rk = f"recall_at_{k}"
    lines.append("| system | index | knobs | recall@10 | QPS | p50 ms | p99 ms |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["system"] == "colgrid":
            index, knobs = "fp16", f"nprobe {r['nprobe']}, n_candidates {r['n_candidates']}"
        elif r["system"] == "fast-plaid":
            index, knobs = r["index"], f"n_ivf_probe {r['n_ivf_probe']}, n_full_scores {r['n_full_scores']}"
        else:
            index, knobs = "fp16", "every document"
        lines.append(f"| {r['system']} | {index} | {knobs} | {r[rk]:.3f} | {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    return "\n".join(lines)


def print_report(report: dict[str, Any], k: int) -> None:
    rk = f"recall_at_{k}"
    print(f"\nP1 — {report['corpus']['documents']:,} documents, {report['index']['colgrid']['tokens']:,} tokens, "
          f"{report['queries']} queries, {report['search_threads']} thread(s) per search")
    builds = {"colgrid": report["index"]["colgrid"], **{f"fast-plaid {n}": b for n, b in report["index"]["fast-plaid"].items()}}
    for name, b in builds.items():
        cpu = f", CPU {b['build_cpu_s']:.0f} s" if b.get("build_cpu_s") is not None else ""
        print(f"{name} build: {b['build_s']:.0f} s wall{cpu}, {b['bytes_on_disk'] / 2**20:.0f} MiB on disk, peak RSS {b['peak_rss_mb']:.0f} MB")
    print()
    print(markdown(report["sweep"], k))
    if "machine_threads_sweep" in report:
        print(f"\nat {report['config']['machine_threads']} threads:\n")
        print(markdown(report["machine_threads_sweep"], k))
    print("\nfrontier (Pareto):")
    for system, rows in report["frontier"].items():
        print(f"  {system}: " + ", ".join(f"{r[rk]:.3f}@{r['qps']:.1f}" for r in rows))
    for threads, cmp in report["at_target"].items():
        print(f"\nrecall@{k} >= {TARGET_RECALL}, {threads} thread(s):")
        for system, row in cmp["points"].items():
            best = cmp["most_accurate"][system]
            print(f"  {system:<28} " + (f"{label(row)}: recall {row[rk]:.3f}, {row['qps']:.1f} QPS" if row else
                                         f"never reached (most accurate: {label(best)}: recall {best[rk]:.3f}, {best['qps']:.1f} QPS)"))
        if cmp.get("qps_ratio_colgrid_over_fastplaid") is not None:
            print(f"  QPS ratio colgrid / fast-plaid: {cmp['qps_ratio_colgrid_over_fastplaid']:.2f}")


# --- main ------------------------------------------------------------------------------------


def pairs_list(text: str) -> list[tuple[int, int]]:
    """"8x4096,16x1024" -> [(8, 4096), (16, 1024)]."""
    return [(int(a), int(b)) for a, b in (item.split("x") for item in text.split(",") if item.strip())]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents (bench_search.py's corpus split)")
    p.add_argument("--queries", type=int, default=200, help="queries of bench_search.py's split (its cached ground truth)")
    p.add_argument("--limit-queries", type=int, default=100, help="sweep only the first N queries")
    p.add_argument("--out", type=Path, default=HERE / "results" / "fastplaid.json")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work")
    p.add_argument("--venv", type=Path, default=None, help="fast-plaid's virtualenv (default: WORK/fastplaid-venv)")
    p.add_argument("--python", default=shutil.which("python3.11") or sys.executable, help="interpreter for a new venv")
    p.add_argument("--fast-plaid-version", default="1.7.0.2110")
    p.add_argument("--torch-version", default="2.11.0", help="the torch that fast-plaid release is built against")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=bs.int_list, default=[1, 2, 4, 8, 16, 32], help="colgrid, comma-separated")
    p.add_argument("--n-candidates", type=bs.int_list, default=[64, 128, 256, 1024, 4096], help="colgrid, comma-separated")
    p.add_argument("--n-ivf-probe", type=bs.int_list, default=[1, 4, 16], help="fast-plaid, comma-separated")
    p.add_argument("--n-full-scores", type=bs.int_list, default=[64, 256, 1024], help="fast-plaid, comma-separated")
    p.add_argument("--fp-extra", type=pairs_list, default=[(8, 4096)],
                   help="fast-plaid settings beyond the grid, n_ivf_probe x n_full_scores (default: its defaults, 8x4096)")
    p.add_argument("--nbits", type=bs.int_list, default=[4], help="fast-plaid residual bits (2, 4 or 8), one index each")
    p.add_argument("--fp-points-per-centroid", type=int, default=FP_DEFAULT_POINTS_PER_CENTROID,
                   help="fast-plaid's k-means sample (max_points_per_centroid); colgrid's build samples 16 tokens per centroid")
    p.add_argument("--threads", type=int, default=1, help="torch (and rayon) threads per search, both systems")
    p.add_argument("--build-threads", type=int, default=os.cpu_count() or 1, help="threads of both index builds")
    p.add_argument("--machine-threads", type=int, default=os.cpu_count() or 1,
                   help="also time each system's operating point at the target recall with this many threads (0: skip)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-exhaustive", action="store_true", help="do not re-time exhaustive search in the sweep")
    p.add_argument("--build-only", action="store_true", help="prepare the venv, embeddings and indexes, then stop")
    p.add_argument("--rebuild", action="store_true", help="rebuild both systems' indexes")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    k = args.k
    work = args.work_dir.resolve()
    venv = (args.venv or work / "fastplaid-venv").resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict[str, Any] = {"machine": bs.machine(), "code": bs.code_version(),
                              "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()}}  # fmt: skip

    versions = ensure_venv(venv, args.fast_plaid_version, args.torch_version, args.python)
    py = venv / "bin" / "python"
    report["fast_plaid_env"] = {"venv": str(venv), **versions}

    # bench_search.py's corpus, version (its fp16 tokens are the embeddings), queries, ground truth.
    docs, queries, _ = bs.cached_corpus(work, args.docs, args.queries, args.seed, False)
    report["corpus"] = {"documents": len(docs), "queries_in_split": len(queries)}
    encoder_dir = ensure_default_encoder(work / "data")
    encoder = load_encoder(encoder_dir)
    search_args = bs.parse_args(["--docs", str(args.docs), "--queries", str(args.queries), "--work-dir", str(work)])
    source_dir, source_build = bs.ensure_version(docs, work, encoder, encoder_dir, search_args)
    source = open_version(source_dir, verify=False, device="cpu")
    encoded = encoder.encode_queries([q.text for q in queries])
    truth_key = bs.digest([source.manifest_sha256, str(k), *(q.text for q in queries)])[:16]
    truth = bs.exhaustive_truth(Searcher(source, threads=args.threads), encoded, k, work / "truth" / f"{truth_key}.json")
    root = work / "fastplaid" / source_dir.name
    vectors = export_vectors(root / "vectors", source, [q.vectors for q in encoded])
    report["source_version"] = {"path": str(source_dir), "bytes_on_disk_with_texts": bs.bytes_on_disk(source_dir), **source_build}
    del source, docs

    # Both systems index the exported arrays, each in its own process, one after the other.
    colgrid_dir, colgrid_build = ensure_colgrid_index(vectors, root, args.build_threads, args.rebuild)
    colgrid_build["bytes_on_disk"] = bs.bytes_on_disk(colgrid_dir)
    fp_builds, fp_indexes = {}, []
    for nbits in args.nbits:
        index, record = ensure_fastplaid_index(py, vectors, root, nbits, args.fp_points_per_centroid, args.build_threads, args.rebuild)
        fp_builds[index.name] = record
        fp_indexes.append(index)
    report["index"] = {"colgrid": colgrid_build, "fast-plaid": fp_builds}
    if args.build_only:
        return report
    started = time.perf_counter()
    version = open_version(colgrid_dir, verify=True, device="cpu")
    colgrid_build["load_s"] = time.perf_counter() - started
    searcher = Searcher(version, threads=args.threads)

    n = min(args.limit_queries, len(encoded))
    encoded, top = encoded[:n], truth["top"][:n]
    report["queries"] = n
    report["query_tokens_mean"] = float(np.mean([q.vectors.shape[0] for q in encoded]))
    report["search_threads"] = args.threads
    colgrid = [(p, c) for p in args.nprobe for c in args.n_candidates if c >= k]
    pairs = list(dict.fromkeys([(p, f) for p in args.n_ivf_probe for f in args.n_full_scores if f >= k] + args.fp_extra))
    fastplaid = [(ix.name, p, f) for ix in fp_indexes for p, f in pairs]

    bs.log(f"sweep: {len(colgrid)} colgrid + {len(fastplaid)} fast-plaid settings + exhaustive, {n} queries, {args.threads} thread(s)")
    worker = Worker(py, vectors, fp_indexes, args.threads)
    report["fast_plaid_env"].update(worker.ready)
    rows = sweep(searcher, worker, encoded, top, version.doc_ids, k, colgrid, fastplaid, not args.no_exhaustive, args.warmup)
    worker.close()
    report["sweep"] = rows
    systems = {"colgrid": [r for r in rows if r["system"] == "colgrid"]}
    for ix in fp_indexes:
        systems[f"fast-plaid {ix.name}"] = [r for r in rows if r.get("index") == ix.name]
    systems["exhaustive"] = [r for r in rows if r["system"] == "exhaustive"]
    report["frontier"] = {name: frontier(rs, k) for name, rs in systems.items() if rs}
    points = {name: best_at(rs, k, TARGET_RECALL) for name, rs in systems.items() if rs}
    report["at_target"] = {str(args.threads): comparison(points, systems, k)}

    if args.machine_threads and args.machine_threads != args.threads:
        # Each system's operating point again with every core (its most accurate setting when it
        # never reaches the target): fewer settings, the same interleaving.
        chosen = {name: points[name] or max(rs, key=lambda r: (r[f"recall_at_{k}"], r["qps"]))
                  for name, rs in systems.items() if rs and name != "exhaustive"}  # fmt: skip
        cg = [(r["nprobe"], r["n_candidates"]) for r in chosen.values() if r["system"] == "colgrid"]
        fp = [(r["index"], r["n_ivf_probe"], r["n_full_scores"]) for r in chosen.values() if r["system"] == "fast-plaid"]
        bs.log(f"operating points at {args.machine_threads} threads")
        searcher_mt = Searcher(version, threads=args.machine_threads)
        worker = Worker(py, vectors, fp_indexes, args.machine_threads)
        mt_rows = sweep(searcher_mt, worker, encoded, top, version.doc_ids, k, cg, fp, False, args.warmup)
        worker.close()
        report["machine_threads_sweep"] = mt_rows
        mt_systems = {name: [r for r in mt_rows if label(r) == label(p)] for name, p in chosen.items()}
        mt_points = {name: best_at(rs, k, TARGET_RECALL) for name, rs in mt_systems.items()}
        report["at_target"][str(args.machine_threads)] = comparison(mt_points, mt_systems, k)

    report["load_average_at_end"] = list(os.getloadavg())
    bs.atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print_report(report, k)
    print(f"\nwrote {args.out}")
    return report


def comparison(points: dict[str, dict[str, Any] | None], systems: dict[str, list[dict[str, Any]]], k: int) -> dict[str, Any]:
    """Each system's first operating point at the target recall (and its most accurate setting),
    and colgrid's QPS over the best fast-plaid index's at the target."""
    cg = points.get("colgrid")
    fps = [p for name, p in points.items() if name.startswith("fast-plaid") and p]
    best_fp = max(fps, key=lambda r: r["qps"]) if fps else None
    ratio = cg["qps"] / best_fp["qps"] if cg and best_fp else None
    most_accurate = {name: max(rs, key=lambda r: (r[f"recall_at_{k}"], r["qps"])) for name, rs in systems.items() if rs}
    return {"target_recall": TARGET_RECALL, "points": points, "most_accurate": most_accurate, "best_fast_plaid": best_fp,
            "qps_ratio_colgrid_over_fastplaid": ratio}  # fmt: skip


if __name__ == "__main__":
    main()
