"""Memory benchmark (issue 5): peak RSS of building and of serving --docs documents (default
100,000) through the commands users run. Not part of CI.

    .venv/bin/python bench/bench_memory.py [--docs 100000] [--out bench/results/memory.json]

Vectors: encoding 100k texts with the bundled MiniLM takes ~80 min on 2 cores, so the build
takes precomputed vectors ("bring your own vectors"), made from the REAL MiniLM token vectors
bench_codecs.py cached (--source: load_vector_files' layout plus queries.npy and
query_offsets.npy). The source documents are cycled: copy 0 is the documents as they are, each
later copy adds gaussian noise of norm --noise to every token and re-normalises, so copies are
distinct vectors and the k-means and codes are realistic; every document keeps its real token
count. They are written block by block as vector files (never held in RAM) under --work-dir,
and kept there for reruns with the same parameters.

Build: `colgrid index build NAME --vectors DIR --data-dir D` in a child process; it reports its
own VmHWM (/proc/self/status) when done, and this script samples its RSS (anonymous and
file-backed apart) every --interval seconds for a timeline.

Serve: `colgrid serve --data-dir D` in a child process, sampled the same way, then one client
sends the held-out query vectors (--passes times over them) one at a time and times them; the
first --recall-queries also go to the exhaustive (exact MaxSim over every document) search for
recall@10 (of the default search, and of a wider one: nprobe 8, n_candidates 512).
/proc/PID/io of the server before and after the timed searches shows how many bytes it read
per query (a per-query decode of Zarr chunks would read 4 MiB chunks). A second server runs
with --int8-screen (--no-screen skips it). See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_search import atomic_write, code_version  # noqa: E402
from colgrid_server.index import load_vector_files  # noqa: E402
from scripts._server import COLGRID, READY_LINE, colgrid_env, kill_now  # noqa: E402

INDEX = "memory"
K = 10
GIB = 1 << 30
MIB = 1 << 20
TARGET_BYTES = 24 * GIB  # issue 5
WIDE = (8, 512)  # (nprobe, n_candidates) beside the defaults, for recall only
DEFAULT_SOURCE = HERE / ".work" / "codecs" / "20000docs-ddcf5b907617e92e-aa81793a28e7cee9" / "vectors"
WRITE_ROWS = 1 << 17  # token rows generated per step: ~200 MB of float32 at dim 384
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
# The child that runs the CLI exactly as the `colgrid` script does, then reports its own peak.
BUILD_CHILD = (
    "import sys, json\n"
    "from colgrid_server.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "status = {l.split(':')[0]: int(l.split()[1]) * 1024\n"
    "          for l in open('/proc/self/status') if l.startswith(('Vm', 'Rss'))}\n"
    "print('BENCH_STATUS ' + json.dumps(status), file=sys.stderr, flush=True)\n"
    "sys.exit(rc)\n"
)


# --- vectors ---------------------------------------------------------------------------------


def prepare_vectors(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """The directory of vector files for --docs documents (made once per parameter set)."""
    source = args.source.resolve()
    for name in ("queries.npy", "query_offsets.npy"):
        if not (source / name).is_file():
            sys.exit(f"{source} has no {name}: the benchmark needs query vectors beside the documents")
    src = load_vector_files(source)
    m = min(args.source_docs or len(src.doc_ids), len(src.doc_ids))
    key = f"{args.docs}docs-{m}src-noise{args.noise:g}-seed{args.seed}"
    target = work / "vectors" / key
    if (target / "source.json").is_file():
        info = json.loads((target / "source.json").read_text())
        if info.get("source") == str(source):
            log(f"reusing the vector files in {target}")
            return target, info
    lengths = np.diff(src.doc_offsets[: m + 1])
    n_tok = int(lengths[np.arange(args.docs) % m].sum())
    dim = int(src.tokens.shape[1])
    check_disk(work, vectors_bytes=n_tok * dim * 2, n_tok=n_tok, dim=dim, codec=args.codec)
    log(f"writing {args.docs:,} documents ({n_tok:,} tokens of dim {dim}) from {m:,} source documents to {target}")
    started = time.perf_counter()
    info = write_vectors(target, src, m, args)
    info["write_s"] = time.perf_counter() - started
    (target / "source.json").write_text(json.dumps(info, indent=1))
    return target, info


def write_vectors(target: Path, src: Any, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """tokens.npy (float16), doc_offsets.npy and doc_ids.txt for args.docs documents cycling the
    first m source documents; copy c > 0 gets noise of norm args.noise per token, re-normalised.
    Written sequentially, WRITE_ROWS rows at a time."""
    n_docs, dim = args.docs, int(src.tokens.shape[1])
    src_offsets = np.asarray(src.doc_offsets, dtype=np.int64)
    lengths = np.diff(src_offsets[: m + 1])
    offsets = np.concatenate([[0], np.cumsum(lengths[np.arange(n_docs) % m])]).astype(np.int64)
    n_tok = int(offsets[-1])
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    sigma = args.noise / math.sqrt(dim)  # E|noise| = args.noise
    ids: list[str] = []
    with open(tmp / "tokens.npy", "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")), "fortran_order": False, "shape": (n_tok, dim)}
        np.lib.format.write_array_header_1_0(fh, header)
        for copy in range(math.ceil(n_docs / m)):
            docs_here = min(m, n_docs - copy * m)
            ids.extend(src.doc_ids[:docs_here] if copy == 0 else [f"{i}~{copy}" for i in src.doc_ids[:docs_here]])
            end = int(src_offsets[docs_here])
            for lo in range(0, end, WRITE_ROWS):
                block = np.asarray(src.tokens[lo : min(end, lo + WRITE_ROWS)], dtype=np.float32)
                if copy:
                    block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(sigma)
                    block /= np.linalg.norm(block, axis=1, keepdims=True)
                fh.write(block.astype("<f2").tobytes())
            log(f"  copy {copy}: {docs_here:,} documents written")
    np.save(tmp / "doc_offsets.npy", offsets)
    (tmp / "doc_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    written = np.load(tmp / "tokens.npy", mmap_mode="r")
    assert written.shape == (n_tok, dim) and written.dtype == np.float16, (written.shape, written.dtype)
    os.rename(tmp, target)
    return {"source": str(args.source.resolve()), "source_documents": m, "documents": n_docs, "tokens": n_tok,
            "dim": dim, "copies": math.ceil(n_docs / m), "noise_norm": args.noise, "seed": args.seed,
            "bytes": n_tok * dim * 2}  # fmt: skip


def check_disk(work: Path, *, vectors_bytes: int, n_tok: int, dim: int, codec: str) -> None:
    """Refuse to start a run the disk cannot hold: the vector files, plus the version (float16
    tokens staged during the build, and the codec's own arrays beside them until it finishes)."""
    codec_extra = {"fp16": 0, "int8": dim + 4, "residual4": dim // 2, "residual2": dim // 4}[codec]
    need = vectors_bytes + n_tok * (2 * dim + 2 + codec_extra) + GIB // 2
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if need > free:
        sys.exit(f"not enough disk under {work}: this run needs about {need / GIB:.1f} GiB "
                 f"({vectors_bytes / GIB:.1f} GiB of vector files and the index version), "
                 f"{free / GIB:.1f} GiB are free; free space, pass a smaller --docs, or another --work-dir")


def read_queries(source: Path) -> list[np.ndarray]:
    flat, offsets = np.load(source / "queries.npy"), np.load(source / "query_offsets.npy")
    return [np.ascontiguousarray(flat[offsets[i] : offsets[i + 1]], dtype=np.float32) for i in range(len(offsets) - 1)]


# --- process memory --------------------------------------------------------------------------


def proc_status(pid: int | str) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a process, in bytes (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                name = line.split(":", 1)[0]
                if name in STATUS_FIELDS:
                    out[name] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None


def proc_io(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/io", encoding="ascii") as fh:
        return {k: int(v) for k, v in (line.split(":") for line in fh)}


class Sampler(threading.Thread):
    """RSS (total, anonymous, file-backed) of one process every `interval` seconds, labelled
    with the phase the main thread is in."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.phase = "start"
        self.samples: list[tuple[float, str, int, int, int]] = []
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def mark(self, phase: str) -> None:
        """Enter `phase`, with one sample at once (a short phase still gets one)."""
        self.phase = phase
        self._sample()

    def _sample(self) -> None:
        s = proc_status(self.pid)
        if s.get("VmRSS"):
            self.samples.append((time.monotonic() - self._t0, self.phase, s["VmRSS"], s.get("RssAnon", 0), s.get("RssFile", 0)))

    def run(self) -> None:
        # Until the child has exec'd it may share our memory (vfork): its status would be ours.
        ours = Path("/proc/self/cmdline").read_bytes()
        while not self._done.is_set() and _cmdline(self.pid) in (ours, b""):
            self._done.wait(0.01)
        while not self._done.is_set():
            self._sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def peaks(self, phase: str | None = None) -> dict[str, int]:
        rows = [s for s in self.samples if phase is None or s[1] == phase]
        return {"rss": max((s[2] for s in rows), default=0), "anon": max((s[3] for s in rows), default=0),
                "file": max((s[4] for s in rows), default=0), "samples": len(rows)}  # fmt: skip

    def timeline(self, points: int = 400) -> dict[str, Any]:
        """At most `points` rows [seconds, phase, rss MiB, anon MiB, file MiB], each the sample
        of largest RSS in its time window."""
        if not self.samples:
            return {"columns": [], "rows": []}
        span = self.samples[-1][0] + 1e-9
        windows: dict[int, tuple[float, str, int, int, int]] = {}
        for s in self.samples:
            w = int(s[0] / span * points)
            if w not in windows or s[2] > windows[w][2]:
                windows[w] = s
        rows = [[round(t, 1), ph, round(r / MIB), round(a / MIB), round(f / MIB)] for t, ph, r, a, f in windows.values()]
        return {"columns": ["s", "phase", "rss_mib", "anon_mib", "file_mib"], "interval_s": self.interval, "rows": rows}


# --- build -----------------------------------------------------------------------------------


def build(vectors: Path, data_dir: Path, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], Path]:
    shutil.rmtree(data_dir, ignore_errors=True)
    argv = ["index", "build", INDEX, "--vectors", str(vectors), "--data-dir", str(data_dir), "--codec", args.codec]
    log(f"building: colgrid {' '.join(argv)}")
    out_path, err_path = work / "build.out", work / "build.err"
    load_before = os.getloadavg()
    started = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", BUILD_CHILD, *argv], stdout=out, stderr=err, env=colgrid_env())
        sampler = Sampler(proc.pid, args.interval)
        sampler.phase = "build"
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    stderr = err_path.read_text(errors="replace")
    if rc != 0:
        sys.exit(f"the build failed (exit status {rc}); {err_path}:\n" + "\n".join(stderr.splitlines()[-20:]))
    status = json.loads(next(line for line in stderr.splitlines() if line.startswith("BENCH_STATUS "))[len("BENCH_STATUS "):])
    version_dir = next(p for p in (data_dir / "indexes" / INDEX).iterdir() if p.is_dir() and not p.name.startswith("."))
    attrs = json.loads((version_dir / "zarr.json").read_text())["attributes"]
    peaks = sampler.peaks()
    return {
        "command": "colgrid " + " ".join(argv),
        "cli_output": out_path.read_text().strip(),
        "wall_s": wall,
        # The child's own VmHWM when the build returned (anonymous and file-backed pages), or a
        # later sample if higher (interpreter shutdown maps a few more library pages).
        "peak_rss_bytes": max(status["VmHWM"], peaks["rss"]),
        "vmhwm_at_build_end_bytes": status["VmHWM"],
        "sampled_peak_rss_bytes": peaks["rss"],
        "sampled_peak_anon_bytes": peaks["anon"],
        "sampled_peak_file_bytes": peaks["file"],
        "rss_at_exit_bytes": status.get("VmRSS"),
        "version": version_dir.name,
        "counts": attrs["counts"],
        "build_params": attrs["build_params"],
        "disk": disk_usage(version_dir),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "timeline": sampler.timeline(),
    }, version_dir


def disk_usage(version_dir: Path) -> dict[str, Any]:
    per_array: dict[str, int] = {}
    total = 0
    for path in version_dir.rglob("*"):
        if path.is_file():
            size = path.stat().st_size
            total += size
            top = path.relative_to(version_dir).parts[0]
            per_array[top] = per_array.get(top, 0) + size
    return {"bytes": total, "per_array_bytes": dict(sorted(per_array.items(), key=lambda kv: -kv[1]))}


def resident_estimate(version_dir: Path, screen: bool) -> dict[str, int]:
    """What LoadedVersion.nbytes reports for this version once served, from the arrays' shapes
    (loading it here would take its memory a second time): float16 tokens (a compressed codec is
    decoded at load), doc_offsets, centroids, token_codes, ivf_offsets, ivf_docs; texts are empty
    and spans a view for external vectors. With the int8 screen: its codes and per-document bounds."""
    meta = {}
    for name in ("doc_offsets", "centroids", "token_codes", "ivf_offsets", "ivf_docs"):
        m = json.loads((version_dir / name / "zarr.json").read_text())
        meta[name] = math.prod(m["shape"]) * np.dtype(m["data_type"]).itemsize
    attrs = json.loads((version_dir / "zarr.json").read_text())["attributes"]
    n_tok, n_doc, dim = attrs["counts"]["tokens"], attrs["counts"]["documents"], attrs["encoder"]["dim"]
    out = {"tokens_float16": n_tok * dim * 2, **meta}
    if screen:
        out["int8_screen"] = n_tok * dim + dim * 8 + 2 * n_doc * 8
    out["total"] = sum(out.values())
    return out


# --- serve -----------------------------------------------------------------------------------


def serve(data_dir: Path, version_dir: Path, queries: list[np.ndarray], args: argparse.Namespace, work: Path,
          *, screen: bool) -> dict[str, Any]:  # fmt: skip
    from colgrid_client import Client

    label = "int8-screen" if screen else "plain"
    log_path = work / f"serve-{label}.log"
    argv = [*COLGRID, "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", "0"]
    argv += ["--int8-screen"] if screen else []
    log(f"serving ({label}): colgrid {' '.join(argv[3:])}")
    load_before = os.getloadavg()
    began = time.monotonic()
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=colgrid_env(), start_new_session=True)
    sampler = Sampler(proc.pid, args.interval)
    sampler.phase = "load"
    sampler.start()
    try:
        target = wait_ready(proc, log_path, args.ready_timeout)
        ready_s = time.monotonic() - began
        after_load = proc_status(proc.pid)
        log(f"  ready in {ready_s:.0f}s, RSS {after_load['VmRSS'] / GIB:.2f} GiB")
        report: dict[str, Any] = {"command": "colgrid " + " ".join(argv[3:]), "ready_s": ready_s, "after_load": after_load}
        with Client(target, timeout=args.search_timeout, retries=0) as client:
            sampler.mark("search")
            for q in queries[: args.warmup]:
                client.search(INDEX, query_vectors=q, k=K)
            io_before = proc_io(proc.pid)
            latencies, found, versions = [], [], set()
            started = time.perf_counter()
            for rep in range(args.passes):
                for q in queries:
                    t0 = time.perf_counter()
                    result = client.search(INDEX, query_vectors=q, k=K)
                    latencies.append(time.perf_counter() - t0)
                    versions.add(result.version)
                    if rep == 0:
                        found.append({h.doc_id: h.score for h in result.hits})
            elapsed = time.perf_counter() - started
            io_after = proc_io(proc.pid)
            sampler.mark("search")
            after_search = proc_status(proc.pid)
            ms = np.asarray(latencies) * 1e3
            n = len(latencies)
            report["searches"] = {
                "count": n, "k": K, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()), "qps_one_client": n / elapsed, "versions": sorted(versions),
                "queries_with_k_hits": sum(len(f) == K for f in found), "queries": len(found),
                "read_bytes_per_query": {name: (io_after[name] - io_before[name]) / n for name in ("rchar", "read_bytes", "syscr")},
            }  # fmt: skip
            report["after_searches"] = after_search
            log(f"  {n} searches: p50 {report['searches']['p50_ms']:.1f} ms, p99 {report['searches']['p99_ms']:.1f} ms, "
                f"RSS {after_search['VmRSS'] / GIB:.2f} GiB, peak {after_search['VmHWM'] / GIB:.2f} GiB")
            if args.recall_queries and not screen:
                sampler.mark("exhaustive")
                chosen = queries[: args.recall_queries]
                t0 = time.perf_counter()
                truth = [{h.doc_id: h.score for h in client.search(INDEX, query_vectors=q, k=K, exhaustive=True).hits}
                         for q in chosen]  # fmt: skip
                per_query = (time.perf_counter() - t0) / len(chosen)
                after_exhaustive = proc_status(proc.pid)
                wide = [{h.doc_id: h.score for h in client.search(INDEX, query_vectors=q, k=K, nprobe=WIDE[0],
                                                                   n_candidates=WIDE[1]).hits} for q in chosen]  # fmt: skip
                report["recall"] = {
                    "queries": len(chosen), "exhaustive_s_per_query": per_query, "after_exhaustive": after_exhaustive,
                    **recall_figures(found, truth), "wide": {"nprobe": WIDE[0], "n_candidates": WIDE[1], **recall_figures(wide, truth)},
                }  # fmt: skip
                log(f"  recall@10 {report['recall']['recall_at_10']:.3f} on {len(chosen)} queries "
                    f"({per_query:.1f} s per exhaustive search); {report['recall']['wide']['recall_at_10']:.3f} at "
                    f"nprobe {WIDE[0]}, n_candidates {WIDE[1]}")
        report["peak_rss_bytes"] = proc_status(proc.pid)["VmHWM"]
    finally:
        sampler.stop()
        stop(proc)
    report["sampled"] = {phase: sampler.peaks(phase) for phase in ("load", "search", "exhaustive") if sampler.peaks(phase)["samples"]}
    report["resident_arrays"] = resident_estimate(version_dir, screen)
    report["load_average_before"] = list(load_before)
    report["load_average_after"] = list(os.getloadavg())
    report["timeline"] = sampler.timeline()
    return report


def recall_figures(found: list[dict[str, float]], truth: list[dict[str, float]]) -> dict[str, Any]:
    """recall@10 against the exhaustive top 10 (mean, min, per query), and the share of the
    exhaustive top 10's total score the hits reach (near 1 when misses are near ties)."""
    recalls = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]
    shares = [sum(f.values()) / sum(t.values()) for f, t in zip(found, truth)]
    return {"recall_at_10": float(np.mean(recalls)), "min_recall_at_10": float(np.min(recalls)),
            "per_query": [round(r, 2) for r in recalls], "score_share": float(np.mean(shares)),
            "min_score_share": float(np.min(shares))}  # fmt: skip


def wait_ready(proc: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    began = time.monotonic()
    while True:
        text = log_path.read_text(errors="replace")
        if (match := READY_LINE.search(text)) and proc.poll() is None:
            return f"{match.group(1)}:{match.group(2)}"
        if proc.poll() is not None or time.monotonic() - began > timeout_s:
            kill_now(proc)
            sys.exit(f"colgrid serve (status {proc.returncode}) did not serve within {timeout_s:.0f}s; log {log_path}:\n"
                     + "\n".join(text.splitlines()[-20:]))
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            kill_now(proc)


# --- report ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    v, b, m = report["vectors"], report["build"], report["machine"]
    print(f"\ncolgrid memory benchmark — {v['documents']:,} documents, {v['tokens']:,} tokens of dim {v['dim']} "
          f"(real MiniLM tokens cycled ×{v['copies']} with noise {v['noise_norm']:g}), codec {report['config']['codec']}, "
          f"{m['cpu']} × {m['cpu_count']}, {m['memory_bytes'] / GIB:.1f} GiB RAM")  # fmt: skip
    gib = lambda x: f"{x / GIB:.2f}"  # noqa: E731
    rows = [("build", f"{b['wall_s']:.0f}", gib(b["peak_rss_bytes"]), gib(b["sampled_peak_anon_bytes"]),
             gib(b["sampled_peak_file_bytes"]), "", f"disk {gib(b['disk']['bytes'])} GiB")]  # fmt: skip
    for label, s in report["serve"].items():
        se = s["searches"]
        extra = f"p50 {se['p50_ms']:.1f} ms, p99 {se['p99_ms']:.1f} ms, {se['qps_one_client']:.1f} QPS"
        if "recall" in s:
            extra += f", recall@10 {s['recall']['recall_at_10']:.3f}"
        rows.append((f"serve {label}", f"{s['ready_s']:.0f}", gib(s["peak_rss_bytes"]), gib(s["sampled"]["search"]["anon"]),
                     gib(s["sampled"]["search"]["file"]), gib(s["resident_arrays"]["total"]), extra))  # fmt: skip
    header = ("phase", "seconds", "peak RSS GiB", "anon GiB", "file GiB", "arrays GiB", "")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) if i < 6 else str(x) for i, (x, w) in enumerate(zip(row, widths))))
    print(f"\ntarget: under {TARGET_BYTES / GIB:.0f} GiB for build and serve. seconds: build wall time, serve: until "
          "ready. anon/file: sampled peaks (serve: during searches). arrays: LoadedVersion.nbytes from the shapes.")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    report: dict[str, Any] = {"machine": machine(), "code": code_version(),
                              "config": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    vectors, report["vectors"] = prepare_vectors(args, work)
    data_dir = work / "data"
    if args.serve_only and (work / "build.json").is_file():
        build_report = json.loads((work / "build.json").read_text())
        version_dir = data_dir / "indexes" / INDEX / build_report["version"]
    else:
        n_tok, dim = report["vectors"]["tokens"], report["vectors"]["dim"]
        check_disk(work, vectors_bytes=0, n_tok=n_tok, dim=dim, codec=args.codec)
        build_report, version_dir = build(vectors, data_dir, args, work)
        (work / "build.json").write_text(json.dumps(build_report, indent=1))
        log(f"built in {build_report['wall_s']:.0f}s, peak RSS {build_report['peak_rss_bytes'] / GIB:.2f} GiB")
    report["build"] = build_report
    queries = read_queries(args.source.resolve())
    report["serve"] = {}
    for screen in (False, True) if args.screen else (False,):
        report["serve"]["int8-screen" if screen else "plain"] = serve(data_dir, version_dir, queries, args, work, screen=screen)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["bench_process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["target_bytes"] = TARGET_BYTES
    report["under_target"] = all(x < TARGET_BYTES for x in [build_report["peak_rss_bytes"],
                                                            *(s["peak_rss_bytes"] for s in report["serve"].values())])
    atomic_write(args.out, json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwritten to {args.out}")
    if args.cleanup:
        shutil.rmtree(vectors, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
        log(f"removed {vectors} and {data_dir}")
    return report


# --- plumbing --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100_000, help="documents to build and serve")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                   help="vector files with queries.npy and query_offsets.npy (default: bench_codecs' 20k MiniLM cache)")
    p.add_argument("--source-docs", type=int, default=0, help="cycle only the first N source documents (default: all)")
    p.add_argument("--noise", type=float, default=0.15, help="norm of the gaussian noise added to copies after the first")
    p.add_argument("--codec", choices=["fp16", "int8", "residual4", "residual2"], default="fp16")
    p.add_argument("--passes", type=int, default=3, help="timed passes over the queries")
    p.add_argument("--warmup", type=int, default=5, help="untimed searches first")
    p.add_argument("--recall-queries", type=int, default=40, help="queries also searched exhaustively for recall@10")
    p.add_argument("--no-screen", dest="screen", action="store_false", help="skip the second server (--int8-screen)")
    p.add_argument("--serve-only", action="store_true", help="reuse the last build under --work-dir")
    p.add_argument("--interval", type=float, default=0.5, help="RSS sampling period, seconds")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds the server may take to load")
    p.add_argument("--search-timeout", type=float, default=600.0, help="seconds per search call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cleanup", action="store_true", help="remove the vector files and data dir at the end")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work" / "memory")
    p.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    args = p.parse_args(argv)
    if args.docs < 1 or args.source_docs < 0 or args.noise < 0 or args.passes < 1:
        p.error("--docs and --passes must be positive, --source-docs and --noise not negative")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")),
               platform.processor()) if cpuinfo.exists() else platform.processor()  # fmt: skip
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": meminfo["MemTotal"],
        "memory_available_at_start_bytes": meminfo["MemAvailable"],
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "ONEDNN_", "DNNL_", "MALLOC_"))},
    }


if __name__ == "__main__":
    main()
