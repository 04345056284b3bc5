"""P1: colgrid against fast-plaid (LightOn's PLAID) on the very same token embeddings: recall@10
against exhaustive exact MaxSim vs queries per second for every knob setting of each system,
plus exhaustive search itself; index build time and bytes on disk of each. Not part of CI.

    .venv/bin/python bench/bench_fastplaid.py [--docs 20000] [--limit-queries 100] [--colgrid-codecs fp16,entropy4] [--out bench/results/fastplaid.json]

fast-plaid pins its own torch, so it runs in a separate virtualenv (created here on first use,
--venv) as a child process (_fastplaid_worker.py). The corpus, the colgrid version (its fp16
tokens are the embeddings both systems index), the queries and the exhaustive ground truth are
bench_search.py's, cached under --work-dir; the embeddings are exported once as .npy for
fast-plaid. colgrid builds one version per --colgrid-codecs entry from the same arrays (each its
own system on the curve). Settings of both systems are interleaved per query (the two processes take turns,
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
import bench_codecs as bc  # noqa: E402  (duplicate-aware recall)
import bench_search as bs  # noqa: E402  (the corpus, version and ground truth it caches)

from colgrid_server.encoders import ensure_default_encoder, load_encoder  # noqa: E402
from colgrid_server.index import CODECS, LoadedVersion, build_version_from_arrays, open_version, version_exists  # noqa: E402
from colgrid_server.search import SearchParams, Searcher  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_fastplaid_worker.py"
TARGET_RECALL = 0.95
FP_DEFAULT_POINTS_PER_CENTROID = 256  # FastPlaid.create's max_points_per_centroid
HEADLINE_CODEC = "fp16"  # the headline ratio: colgrid's default version against the best fast-plaid index
# colgrid codecs stored in the same bytes per token as a fast-plaid index of nbits (dim 384:
# entropy4 <= 192 B/token, fast-plaid nbits 4 = 192 B/token of residuals): compared pairwise.
EQUAL_BYTES_NBITS = {"entropy4": 4, "entropy2": 2}


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


def colgrid_build_child(vectors: str, final_dir: str, codec: str, threads: int, record_path: str) -> None:
    torch.set_num_threads(threads)
    source = json.loads((Path(vectors) / "source.json").read_text())
    tokens = np.load(Path(vectors) / "tokens.npy", mmap_mode="r")
    offsets = np.load(Path(vectors) / "doc_offsets.npy")
    ids = (Path(vectors) / "doc_ids.txt").read_text(encoding="utf-8").splitlines()
    load_before = list(os.getloadavg())
    started, cpu_started = time.perf_counter(), cpu_seconds()
    summary = build_version_from_arrays(Path(final_dir), tokens=tokens, doc_offsets=offsets, doc_ids=ids,
                                        normalized=bool(source.get("normalized", True)), build_params={"codec": codec})  # fmt: skip
    record = {"documents": summary.documents, "tokens": summary.tokens, "centroids": summary.centroids,
              "build_s": time.perf_counter() - started, "build_cpu_s": cpu_seconds() - cpu_started, "threads": threads,
              "peak_rss_mb": bs.peak_rss_mb(), "peak_rss_source": "VmHWM", "load_average_at_start": load_before, "load_average_at_end": list(os.getloadavg()),
              "codec": codec,
              "knobs": f"build_version_from_arrays defaults, build_params codec={codec}", "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    Path(record_path).write_text(json.dumps(record, indent=2))


def ensure_colgrid_index(vectors: Path, root: Path, codec: str, threads: int, rebuild: bool) -> tuple[Path, dict[str, Any]]:
    """colgrid's version of the exported arrays with the given codec, named colgrid-<codec> (no
    texts: like fast-plaid's index, vectors only), built in a child process so that its peak RSS
    and CPU time are its own."""
    final_dir, record = root / f"colgrid-{codec}", root / f"colgrid-{codec}.build.json"
    if version_exists(final_dir) and record.is_file() and not rebuild:
        # Records written before codecs were selectable are fp16 builds.
        return final_dir, {"codec": "fp16", **json.loads(record.read_text()), "cached": True}
    shutil.rmtree(final_dir, ignore_errors=True)
    bs.log(f"colgrid: building {final_dir} (codec {codec}, {threads} threads)")
    child = multiprocessing.get_context("spawn").Process(target=colgrid_build_child,
                                                         args=(str(vectors), str(final_dir), codec, threads, str(record)))  # fmt: skip
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


def colgrid_system(index: str) -> str:
    """"colgrid-entropy4" (a version's directory name) -> "colgrid entropy4" (its system name)."""
    return "colgrid " + index.removeprefix("colgrid-")


def sweep(searchers: dict[str, Searcher], worker: Worker, encoded: list[Any], truth: list[list[str]], doc_ids: list[str],
          k: int, colgrid: list[tuple[str, int, int]], fastplaid: list[tuple[str, int, int]], exhaustive: Sequence[str],
          warmup: int, content: dict[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    """Every setting of every colgrid version (searchers, by version name) and of fast-plaid on
    every query; exhaustive search on each version named in exhaustive. The two processes take
    turns per query (which goes first alternates, and so does the order of the colgrid versions),
    so load from other processes falls on all alike; only one process works at any moment.
    content: document id -> digest of its vectors, for the duplicate-aware recall."""
    keys: list[tuple[str, ...]] = [("colgrid", name, str(p), str(c)) for name, p, c in colgrid]
    params = {key: SearchParams(k=k, nprobe=int(key[2]), n_candidates=int(key[3])) for key in keys}
    keys += [("exhaustive", name) for name in exhaustive]
    local = list(keys)  # answered in this process, by version
    keys += [("fast-plaid", name, str(probe), str(full)) for name, probe, full in fastplaid]
    groups = [[key for key in local if key[1] == name] for name in dict.fromkeys(key[1] for key in local)]
    seconds: dict[tuple[str, ...], list[float]] = {key: [] for key in keys}
    found: dict[tuple[str, ...], list[list[str]]] = {key: [] for key in keys}
    for i in range(min(warmup, len(encoded))):
        for key, p in params.items():
            searchers[key[1]].search(encoded[i].vectors, encoded[i].tokens, p)
        worker.search(i, fastplaid, k)

    def run_colgrid(i: int) -> None:
        q = encoded[i]
        for group in (groups if i % 2 == 0 else groups[::-1]):
            for key in group:
                searcher = searchers[key[1]]
                started = time.perf_counter()
                if key[0] == "exhaustive":
                    result = searcher.exhaustive(q.vectors, q.tokens, SearchParams(k=k))
                else:
                    result = searcher.search(q.vectors, q.tokens, params[key])
                seconds[key].append(time.perf_counter() - started)
                found[key].append([h.doc_id for h in result.hits])

    def run_fastplaid(i: int) -> None:
        reply = worker.search(i, fastplaid, k)
        for key, r in zip(keys[len(local):], reply["results"]):
            seconds[key].append(r["seconds"])
            found[key].append([doc_ids[d] for d in r["ids"]][:k])

    for i in range(len(encoded)):
        for run in ((run_colgrid, run_fastplaid) if i % 2 == 0 else (run_fastplaid, run_colgrid)):
            run(i)
        if (i + 1) % 10 == 0:
            bs.log(f"  sweep {i + 1}/{len(encoded)} queries")
    rows = []
    for key in keys:
        row: dict[str, Any] = {"system": key[0], "index": key[1]}
        if key[0] == "colgrid":
            row.update(nprobe=int(key[2]), n_candidates=int(key[3]))
        elif key[0] == "fast-plaid":
            row.update(n_ivf_probe=int(key[2]), n_full_scores=int(key[3]))
        truth_k = [t[:k] for t in truth[:len(found[key])]]
        row[f"recall_at_{k}"] = float(np.mean(bc.per_query_recall(found[key], truth_k)))
        row[f"recall_at_{k}_duplicate_aware"] = float(np.mean(bc.per_query_recall(found[key], truth_k, content)))
        row.update(bs.latency_figures(seconds[key]))
        rows.append(row)
    return rows


def by_system(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    systems: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        systems.setdefault(system_of(r), []).append(r)
    return systems


def duplicate_aware(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The rows with their duplicate-aware recall in the recall column (for the same comparisons)."""
    return [{**r, f"recall_at_{k}": r[f"recall_at_{k}_duplicate_aware"]} for r in rows]


def system_of(row: dict[str, Any]) -> str:
    """The curve a row belongs to: "colgrid fp16", "fast-plaid nbits4-kmeans16", "exhaustive fp16"."""
    if row["system"] == "colgrid":
        return colgrid_system(row["index"])
    if row["system"] == "fast-plaid":
        return f"fast-plaid {row['index']}"
    return "exhaustive " + row["index"].removeprefix("colgrid-")


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


def most_accurate(rows: list[dict[str, Any]], k: int) -> dict[str, Any]:
    return max(rows, key=lambda r: (r[f"recall_at_{k}"], r["qps"]))


def label(row: dict[str, Any]) -> str:
    if row["system"] == "colgrid":
        return f"{colgrid_system(row['index'])} nprobe={row['nprobe']} n_candidates={row['n_candidates']}"
    if row["system"] == "fast-plaid":
        return f"fast-plaid {row['index']} n_ivf_probe={row['n_ivf_probe']} n_full_scores={row['n_full_scores']}"
    return f"exhaustive ({row['index']})"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    return a["qps"] / b["qps"] if a and b else None


def comparison(points: dict[str, dict[str, Any] | None], systems: dict[str, list[dict[str, Any]]], k: int,
               pairs: list[tuple[str, str]]) -> dict[str, Any]:  # fmt: skip
    """Each system's first operating point at the target recall (and its most accurate setting);
    the headline: colgrid fp16's QPS over the best fast-plaid index's at the target; and for each
    (colgrid system, fast-plaid system) pair stored in equal bytes, their QPS at the target and
    at the highest recall the fast-plaid index reaches (the fastest setting of each that gets
    there)."""
    fps = [p for name, p in points.items() if name.startswith("fast-plaid") and p]
    best_fp = max(fps, key=lambda r: r["qps"]) if fps else None
    accurate = {name: most_accurate(rs, k) for name, rs in systems.items() if rs}
    headline = colgrid_system(f"colgrid-{HEADLINE_CODEC}")
    fp_rows = [r for name, rs in systems.items() if name.startswith("fast-plaid") for r in rs]
    at_fp_best = None
    if fp_rows and systems.get(headline):
        # Where no fast-plaid index reaches the target: the highest recall any of them reaches.
        reach = most_accurate(fp_rows, k)[f"recall_at_{k}"]
        matched = {"colgrid": best_at(systems[headline], k, reach), "fast_plaid": best_at(fp_rows, k, reach)}
        at_fp_best = {"recall": reach, **matched, "qps_ratio": ratio(matched["colgrid"], matched["fast_plaid"])}
    equal = []
    for cg, fp in pairs:
        if not systems.get(cg) or not systems.get(fp):
            continue
        reach = accurate[fp][f"recall_at_{k}"]
        matched = {"colgrid": best_at(systems[cg], k, reach), "fast_plaid": best_at(systems[fp], k, reach)}
        equal.append({"colgrid_system": cg, "fast_plaid_system": fp,
                      "at_target": {"colgrid": points.get(cg), "fast_plaid": points.get(fp),
                                    "qps_ratio": ratio(points.get(cg), points.get(fp))},
                      "most_accurate": {"colgrid": accurate[cg], "fast_plaid": accurate[fp]},
                      "at_fast_plaid_best_recall": {"recall": reach, **matched,
                                                    "qps_ratio": ratio(matched["colgrid"], matched["fast_plaid"])}})  # fmt: skip
    return {"target_recall": TARGET_RECALL, "points": points, "most_accurate": accurate, "best_fast_plaid": best_fp,
            "headline_colgrid_system": headline, "qps_ratio_colgrid_over_fastplaid": ratio(points.get(headline), best_fp),
            "headline_at_fast_plaid_best_recall": at_fp_best, "equal_bytes": equal}  # fmt: skip


# --- output ----------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], k: int) -> str:
    lines = []
    rk = f"recall_at_{k}"
    lines.append("| system | index | knobs | recall@10 | dup-aware | QPS | p50 ms | p99 ms |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["system"] == "colgrid":
            index, knobs = r["index"].removeprefix("colgrid-"), f"nprobe {r['nprobe']}, n_candidates {r['n_candidates']}"
        elif r["system"] == "fast-plaid":
            index, knobs = r["index"], f"n_ivf_probe {r['n_ivf_probe']}, n_full_scores {r['n_full_scores']}"
        else:
            index, knobs = r["index"].removeprefix("colgrid-"), "every document"
        dup = r.get(f"{rk}_duplicate_aware")
        lines.append(f"| {r['system']} | {index} | {knobs} | {r[rk]:.3f} | {'' if dup is None else f'{dup:.3f}'} "
                     f"| {r['qps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    return "\n".join(lines)


def print_report(report: dict[str, Any], k: int) -> None:
    rk = f"recall_at_{k}"
    tokens = next(iter(report["index"]["colgrid"].values()))["tokens"]
    print(f"\nP1 — {report['corpus']['documents']:,} documents, {tokens:,} tokens, "
          f"{report['queries']} queries, {report['search_threads']} thread(s) per search")
    builds = {**{colgrid_system(n): b for n, b in report["index"]["colgrid"].items()},
              **{f"fast-plaid {n}": b for n, b in report["index"]["fast-plaid"].items()}}  # fmt: skip
    for name, b in builds.items():
        cpu = f", CPU {b['build_cpu_s']:.0f} s" if b.get("build_cpu_s") is not None else ""
        print(f"{name} build: {b['build_s']:.0f} s wall{cpu}, {b['bytes_on_disk'] / 2**20:.0f} MiB on disk "
              f"({b['bytes_on_disk'] / b['tokens']:.1f} B/token), peak RSS {b['peak_rss_mb']:.0f} MB")
    print()
    print(markdown(report["sweep"], k))
    if "machine_threads_sweep" in report:
        print(f"\nat {report['config']['machine_threads']} threads:\n")
        print(markdown(report["machine_threads_sweep"], k))
    print("\nfrontier (Pareto):")
    for system, rows in report["frontier"].items():
        print(f"  {system}: " + ", ".join(f"{r[rk]:.3f}@{r['qps']:.1f}" for r in rows))

    def point(row: dict[str, Any] | None) -> str:
        return f"{label(row)}: recall {row[rk]:.3f}, {row['qps']:.1f} QPS" if row else "never reached"

    comparisons = [(f"{threads} thread(s)", cmp) for threads, cmp in report["at_target"].items()]
    if "at_target_duplicate_aware" in report:
        comparisons.append((f"{report['search_threads']} thread(s), duplicate-aware recall",
                            report["at_target_duplicate_aware"]))
    for title, cmp in comparisons:
        print(f"\nrecall@{k} >= {TARGET_RECALL}, {title}:")
        for system, row in cmp["points"].items():
            best = cmp["most_accurate"][system]
            print(f"  {system:<28} " + (point(row) if row else f"never reached (most accurate: {point(best)})"))
        if cmp.get("qps_ratio_colgrid_over_fastplaid") is not None:
            print(f"  QPS ratio {cmp['headline_colgrid_system']} / best fast-plaid: {cmp['qps_ratio_colgrid_over_fastplaid']:.2f}")
        if cmp.get("headline_at_fast_plaid_best_recall"):
            m = cmp["headline_at_fast_plaid_best_recall"]
            print(f"  at recall >= {m['recall']:.3f} (the best any fast-plaid index reaches): {point(m['colgrid'])} / "
                  f"{point(m['fast_plaid'])}" + (f": QPS ratio {m['qps_ratio']:.2f}" if m["qps_ratio"] is not None else ""))
        for eq in cmp["equal_bytes"]:
            cg, fp = eq["colgrid_system"], eq["fast_plaid_system"]
            print(f"  equal bytes, {cg} vs {fp}:")
            at = eq["at_target"]
            print(f"    at recall >= {TARGET_RECALL}: QPS ratio " + (f"{at['qps_ratio']:.2f}" if at["qps_ratio"] is not None else "n/a"))
            m = eq["at_fast_plaid_best_recall"]
            print(f"    at recall >= {m['recall']:.3f} ({fp}'s best): {point(m['colgrid'])} / {point(m['fast_plaid'])}"
                  + (f": QPS ratio {m['qps_ratio']:.2f}" if m["qps_ratio"] is not None else ""))


# --- main ------------------------------------------------------------------------------------


def pairs_list(text: str) -> list[tuple[int, int]]:
    """"8x4096,16x1024" -> [(8, 4096), (16, 1024)]."""
    return [(int(a), int(b)) for a, b in (item.split("x") for item in text.split(",") if item.strip())]


def codec_list(text: str) -> list[str]:
    codecs = list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in codecs if c not in CODECS]
    if not codecs or unknown:
        raise argparse.ArgumentTypeError(f"colgrid codecs are among {', '.join(CODECS)}; got {text!r}")
    return codecs


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
    p.add_argument("--colgrid-codecs", type=codec_list, default=["fp16"],
                   help="colgrid versions to build (colgrid-<codec>) and sweep, comma-separated; each is its own curve")
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

    # Every index is built from the exported arrays, each in its own process, one after the other.
    cg_builds: dict[str, dict[str, Any]] = {}
    cg_dirs: dict[str, Path] = {}
    for codec in args.colgrid_codecs:
        cg_dir, record = ensure_colgrid_index(vectors, root, codec, args.build_threads, args.rebuild)
        record["bytes_on_disk"] = bs.bytes_on_disk(cg_dir)
        record["bytes_per_token"] = record["bytes_on_disk"] / record["tokens"]
        cg_builds[cg_dir.name], cg_dirs[cg_dir.name] = record, cg_dir
    fp_builds, fp_indexes = {}, []
    for nbits in args.nbits:
        index, record = ensure_fastplaid_index(py, vectors, root, nbits, args.fp_points_per_centroid, args.build_threads, args.rebuild)
        record["bytes_per_token"] = record["bytes_on_disk"] / record["tokens"]
        fp_builds[index.name] = record
        fp_indexes.append(index)
    report["index"] = {"colgrid": cg_builds, "fast-plaid": fp_builds}
    if args.build_only:
        return report
    loaded: dict[str, LoadedVersion] = {}
    for name, cg_dir in cg_dirs.items():
        started = time.perf_counter()
        loaded[name] = open_version(cg_dir, verify=True, device="cpu")
        cg_builds[name]["load_s"] = time.perf_counter() - started
        cg_builds[name]["loaded_codec"] = loaded[name].codec
    bs.log(f"loaded {', '.join(loaded)}")
    searchers = {name: Searcher(v, threads=args.threads) for name, v in loaded.items()}
    doc_ids = next(iter(loaded.values())).doc_ids
    if any(v.doc_ids != doc_ids for v in loaded.values()):
        sys.exit("colgrid versions disagree on document order")

    n = min(args.limit_queries, len(encoded))
    encoded, top = encoded[:n], truth["top"][:n]
    report["queries"] = n
    report["query_tokens_mean"] = float(np.mean([q.vectors.shape[0] for q in encoded]))
    report["search_threads"] = args.threads
    colgrid = [(name, p, c) for name in cg_dirs for p in args.nprobe for c in args.n_candidates if c >= k]
    pairs = list(dict.fromkeys([(p, f) for p in args.n_ivf_probe for f in args.n_full_scores if f >= k] + args.fp_extra))
    fastplaid = [(ix.name, p, f) for ix in fp_indexes for p, f in pairs]
    # Exhaustive search once, on the fp16 version when there is one (it equals the ground truth's
    # vectors), else on the first.
    exhaustive = [] if args.no_exhaustive else list(cg_dirs)  # each version's ceiling (fp16's is 1: the ground truth's vectors)
    equal_pairs = [(colgrid_system(f"colgrid-{codec}"), f"fast-plaid {name}") for codec in args.colgrid_codecs
                   for name, b in fp_builds.items() if EQUAL_BYTES_NBITS.get(codec) == b["nbits"]]  # fmt: skip

    bs.log(f"sweep: {len(colgrid)} colgrid + {len(fastplaid)} fast-plaid settings" + f" + {len(exhaustive)} exhaustive"
           + f", {n} queries, {args.threads} thread(s)")
    worker = Worker(py, vectors, fp_indexes, args.threads)
    report["fast_plaid_env"].update(worker.ready)
    content = bc.content_keys(vectors)
    rows = sweep(searchers, worker, encoded, top, doc_ids, k, colgrid, fastplaid, exhaustive, args.warmup, content)
    worker.close()
    report["sweep"] = rows
    systems = by_system(rows)
    report["frontier"] = {name: frontier(rs, k) for name, rs in systems.items()}
    points = {name: best_at(rs, k, TARGET_RECALL) for name, rs in systems.items()}
    report["at_target"] = {str(args.threads): comparison(points, systems, k, equal_pairs)}
    # The corpus holds identical documents (one docstring in several modules); which of a tied
    # group makes the top 10 is arbitrary, so the same comparison counting them as one another.
    dup_systems = by_system(duplicate_aware(rows, k))
    dup_points = {name: best_at(rs, k, TARGET_RECALL) for name, rs in dup_systems.items()}
    report["at_target_duplicate_aware"] = comparison(dup_points, dup_systems, k, equal_pairs)

    if args.machine_threads and args.machine_threads != args.threads:
        # Each system's operating point again with every core (its most accurate setting when it
        # never reaches the target): fewer settings, the same interleaving.
        chosen = {name: points[name] or most_accurate(rs, k) for name, rs in systems.items() if not name.startswith("exhaustive")}
        cg = [(r["index"], r["nprobe"], r["n_candidates"]) for r in chosen.values() if r["system"] == "colgrid"]
        fp = [(r["index"], r["n_ivf_probe"], r["n_full_scores"]) for r in chosen.values() if r["system"] == "fast-plaid"]
        bs.log(f"operating points at {args.machine_threads} threads")
        searchers_mt = {name: Searcher(v, threads=args.machine_threads) for name, v in loaded.items()}
        worker = Worker(py, vectors, fp_indexes, args.machine_threads)
        mt_rows = sweep(searchers_mt, worker, encoded, top, doc_ids, k, cg, fp, [], args.warmup, content)
        worker.close()
        report["machine_threads_sweep"] = mt_rows
        mt_systems = {name: [r for r in mt_rows if label(r) == label(p)] for name, p in chosen.items()}
        mt_points = {name: best_at(rs, k, TARGET_RECALL) for name, rs in mt_systems.items()}
        report["at_target"][str(args.machine_threads)] = comparison(mt_points, mt_systems, k, equal_pairs)

    report["load_average_at_end"] = list(os.getloadavg())
    bs.atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print_report(report, k)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
