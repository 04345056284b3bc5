"""Search benchmark on real text: recall@k of the approximate search against exhaustive exact
MaxSim, latency and QPS per knob setting, index build cost, and how close the exact MaxSim kernel
runs to a plain matmul of the same FLOPs. Not part of CI.

    .venv/bin/python bench/bench_search.py [--docs 20000] [--queries 200] [--out bench/results/search.json]

Documents are docstrings of the venv's site-packages and the standard library; queries are
first sentences of held-out docstrings (not in the index) and, every fourth one, a held-out
dotted name turned into a phrase. The built index (it holds the document embeddings) and the
exhaustive ground truth are cached under --work-dir, so reruns skip encoding. See bench/README.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colgrid_server.corpus import iter_docstring_documents, write_jsonl
from colgrid_server.documents import Document, read_jsonl
from colgrid_server.encoders import EncodedText, ensure_default_encoder, load_encoder
from colgrid_server.index import LoadedVersion, build_version, open_version, version_exists
from colgrid_server.search import DEFAULT_N_CANDIDATES, DEFAULT_NPROBE, SearchParams, Searcher, maxsim_scores

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Query:
    text: str
    kind: str  # "sentence" | "name"
    source_id: str  # the held-out document it was made from


# --- corpus and queries ----------------------------------------------------------------------


def corpus_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])]
    return list(dict.fromkeys(r.resolve() for r in roots if r.is_dir()))


def split_corpus(n_docs: int, n_queries: int, seed: int) -> tuple[list[Document], list[Query]]:
    """A seeded random sample of n_docs documents (kept in corpus order) and queries made from
    documents outside it."""
    everything = list(iter_docstring_documents(corpus_roots()))
    order = list(range(len(everything)))
    random.Random(seed).shuffle(order)
    if n_docs + n_queries > len(everything):
        sys.exit(f"the corpus has {len(everything)} documents: too few for --docs {n_docs} plus --queries {n_queries}")
    indexed = [everything[i] for i in sorted(order[:n_docs])]
    queries: list[Query] = []
    for i in order[n_docs:]:
        if len(queries) == n_queries:
            break
        doc = everything[i]
        kind = "name" if len(queries) % 4 == 3 else "sentence"
        text = name_phrase(doc.id) if kind == "name" else first_sentence(doc.text)
        if text:
            queries.append(Query(text=text, kind=kind, source_id=doc.id))
    if len(queries) < n_queries:
        sys.exit(f"only {len(queries)} usable held-out docstrings for --queries {n_queries}; lower --docs")
    return indexed, queries


def cached_corpus(work: Path, n_docs: int, n_queries: int, seed: int, rescan: bool) -> tuple[list[Document], list[Query], bool]:
    """The corpus split saved by an earlier run, else a fresh one (saved for the next run).
    Installing a package changes the scanned corpus; reusing the saved split keeps reruns
    comparable and their caches valid."""
    base = work / "corpus" / f"{n_docs}docs-{n_queries}queries-seed{seed}"
    docs_path, queries_path = base.with_suffix(".docs.jsonl"), base.with_suffix(".queries.json")
    if docs_path.is_file() and queries_path.is_file() and not rescan:
        queries = [Query(**q) for q in json.loads(queries_path.read_text(encoding="utf-8"))]
        return list(read_jsonl(docs_path)), queries, True
    docs, queries = split_corpus(n_docs, n_queries, seed)
    write_jsonl(docs, docs_path)
    atomic_write(queries_path, json.dumps([asdict(q) for q in queries], ensure_ascii=False))
    return docs, queries, False


def first_sentence(text: str) -> str | None:
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    end = re.search(r"(?<=[.!?])\s", paragraph)
    sentence = paragraph[: end.start()] if end else paragraph
    return sentence if 3 <= len(sentence.split()) <= 40 else None


def name_phrase(dotted: str) -> str | None:
    """`json.decoder.JSONDecoder.raw_decode` -> "json decoder raw decode" (owner and name)."""
    words = [w.lower() for part in dotted.split(".")[-2:] for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+|\d+", part)]
    words = list(dict.fromkeys(words))
    return " ".join(words) if len(words) >= 2 else None


def digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


# --- building (in a child process, so its peak RSS is its own) -------------------------------


class TimedEncoder:
    """Adds up the time build_version spends inside encode_documents."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds = inner, 0.0
        self.id, self.kind, self.dim = inner.id, inner.kind, inner.dim

    def encode_documents(self, texts: list[str]) -> list[EncodedText]:
        started = time.perf_counter()
        try:
            return self.inner.encode_documents(texts)
        finally:
            self.seconds += time.perf_counter() - started


class ReplayEncoder:
    """Serves the stored vectors of an earlier build of the same corpus, in order: a rebuild that
    measures the index build alone. The version stores float16 and the writer stores float16, so
    the rebuilt tokens are identical."""

    def __init__(self, version: LoadedVersion) -> None:
        self.version, self.next = version, 0
        self.id, self.kind, self.dim = version.encoder.id, version.encoder.kind, version.encoder.dim

    def encode_documents(self, texts: list[str]) -> list[EncodedText]:
        v, out = self.version, []
        for text in texts:
            i = self.next
            if i >= v.documents or v.texts[i] != text:
                raise RuntimeError(f"cached embeddings at {v.path} do not match the corpus; delete that directory")
            start, end = int(v.doc_offsets[i]), int(v.doc_offsets[i + 1])
            vectors = v.tokens[start:end].float().numpy()
            out.append(EncodedText(vectors=vectors, tokens=[""] * (end - start), spans=v.spans[start:end]))
            self.next += 1
        return out


def build_child(docs: list[Document], final_dir: str, encoder_dir: str, replay_dir: str | None,
                batch_size: int, threads: int | None, record_path: str) -> None:
    if threads:
        torch.set_num_threads(threads)
    if replay_dir:
        encoder = TimedEncoder(ReplayEncoder(open_version(Path(replay_dir), verify=False, device="cpu")))
    else:
        encoder = TimedEncoder(load_encoder(encoder_dir, threads=threads))
    started = time.perf_counter()
    summary = build_version(docs, encoder, Path(final_dir), batch_size=batch_size, progress=True)
    total = time.perf_counter() - started
    record = {
        "documents": summary.documents,
        "tokens": summary.tokens,
        "centroids": summary.centroids,
        "dim": summary.dim,
        "embeddings": "replayed from the cached version" if replay_dir else "encoded",
        "encode_s": encoder.seconds,
        "build_total_s": total,
        "index_build_s": total - encoder.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(record_path).write_text(json.dumps(record, indent=2))


def ensure_version(docs: list[Document], work: Path, encoder: Any, encoder_dir: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The cached version for this corpus, encoder and batch size, built first if needed."""
    key = digest([encoder.id, str(args.batch_size), *(f"{d.id}\n{d.text}" for d in docs)])[:16]
    final_dir = work / "versions" / f"{len(docs)}docs-{key}"
    record_path = final_dir.with_name(final_dir.name + ".build.json")
    if version_exists(final_dir) and record_path.is_file() and not args.rebuild:
        return final_dir, {**json.loads(record_path.read_text()), "cached": True}
    replay_dir = None
    if version_exists(final_dir):
        replay_dir = final_dir.with_name(f".{final_dir.name}.previous")
        shutil.rmtree(replay_dir, ignore_errors=True)
        os.rename(final_dir, replay_dir)
    elif final_dir.exists():
        shutil.rmtree(final_dir)
    for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):  # left by an interrupted build
        shutil.rmtree(stale, ignore_errors=True)
    log(f"building {len(docs)} documents into {final_dir} ({'replaying cached embeddings' if replay_dir else 'encoding'})")
    child = multiprocessing.get_context("spawn").Process(
        target=build_child,
        args=(docs, str(final_dir), str(encoder_dir), str(replay_dir) if replay_dir else None,
              args.batch_size, args.threads, str(record_path)),
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        sys.exit(f"index build failed (exit code {child.exitcode})")
    if replay_dir:
        shutil.rmtree(replay_dir)
    return final_dir, {**json.loads(record_path.read_text()), "cached": False}


# --- measuring -------------------------------------------------------------------------------


def latency_figures(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "qps": float(len(ms) / (ms.sum() / 1e3)),
    }


def exhaustive_truth(searcher: Searcher, encoded: list[EncodedText], k: int, cache: Path) -> dict[str, Any]:
    """Top-k ids of exact MaxSim over every document, per query, and the time each took."""
    if cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}
    params, top, seconds = SearchParams(k=k), [], []
    for i, q in enumerate(encoded):
        started = time.perf_counter()
        result = searcher.exhaustive(q.vectors, q.tokens, params)
        seconds.append(time.perf_counter() - started)
        top.append([hit.doc_id for hit in result.hits])
        if (i + 1) % 25 == 0:
            log(f"  exhaustive {i + 1}/{len(encoded)}")
    truth = {"top": top, "seconds": seconds}
    atomic_write(cache, json.dumps(truth))
    return {**truth, "cached": False}


def sweep(searcher: Searcher, encoded: list[EncodedText], truth: list[list[str]], k: int,
          nprobes: list[int], n_candidates: list[int], warmup: int) -> list[dict[str, Any]]:
    """Every setting on every query. Settings are interleaved per query (not run one after the
    other) so that load from other processes on a shared machine spreads over all of them."""
    settings = [SearchParams(k=k, nprobe=p, n_candidates=c) for p in nprobes for c in n_candidates if c >= k]
    for q in encoded[:warmup]:
        for params in settings:
            searcher.search(q.vectors, q.tokens, params)
    seconds: dict[SearchParams, list[float]] = {p: [] for p in settings}
    recalls: dict[SearchParams, list[float]] = {p: [] for p in settings}
    stats: dict[SearchParams, list[Any]] = {p: [] for p in settings}
    for i, (q, exact) in enumerate(zip(encoded, truth)):
        for params in settings:
            started = time.perf_counter()
            result = searcher.search(q.vectors, q.tokens, params)
            seconds[params].append(time.perf_counter() - started)
            recalls[params].append(len({h.doc_id for h in result.hits} & set(exact)) / len(exact))
            stats[params].append(result.stats)
        if (i + 1) % 25 == 0:
            log(f"  sweep {i + 1}/{len(encoded)} queries")
    rows = []
    for params in settings:
        s = stats[params]
        rows.append({
            "nprobe": params.nprobe,
            "n_candidates": params.n_candidates,
            f"recall_at_{k}": float(np.mean(recalls[params])),
            **latency_figures(seconds[params]),
            "candidates_mean": float(np.mean([x.candidates for x in s])),
            "candidates_ms_mean": float(np.mean([x.candidates_ms for x in s])),
            "maxsim_ms_mean": float(np.mean([x.maxsim_ms for x in s])),
        })
    return rows


def maxsim_kernel(version: LoadedVersion, encoded: list[EncodedText], n_docs: int, repeats: int, seed: int,
                  thread_counts: Sequence[int]) -> list[dict[str, Any]]:
    """Exact MaxSim (maxsim_scores: gather + matmul + segment max) against one plain torch.mm of
    the same FLOPs and dtype on already-gathered, contiguous operands, at each torch intra-op
    thread count (a search runs with Searcher.threads; the process default may differ)."""
    rows = np.concatenate([q.vectors for q in encoded])[:32]  # 32 real query-token vectors
    query = torch.from_numpy(np.ascontiguousarray(rows))
    docs = np.sort(np.random.default_rng(seed).choice(version.documents, size=min(n_docs, version.documents), replace=False))
    starts, ends = version.doc_offsets[docs], version.doc_offsets[docs + 1]
    token_rows = torch.from_numpy(np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]))
    gathered = version.tokens.index_select(0, token_rows).float()
    n_tok, dim = gathered.shape
    gflop = 2.0 * query.shape[0] * n_tok * dim / 1e9
    # Reference scores from the float32 product, segment-max per document in numpy.
    sims = (gathered @ query.T).numpy()
    bounds = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
    reference = np.maximum.reduceat(sims, bounds, axis=0).sum(axis=1)
    out, default_threads = [], torch.get_num_threads()
    for threads, dtype in [(t, d) for t in thread_counts for d in (torch.float32, torch.bfloat16)]:
        a, b = gathered.to(dtype).contiguous(), query.T.to(dtype).contiguous()

        def run_maxsim() -> torch.Tensor:
            return maxsim_scores(query, version.tokens, version.doc_offsets, docs, compute_dtype=dtype)

        torch.set_num_threads(threads)
        try:
            scores = run_maxsim()
            t_maxsim, t_mm = median_seconds([run_maxsim, lambda: torch.mm(a, b)], repeats)
        finally:
            torch.set_num_threads(default_threads)
        out.append({
            "threads": threads,
            "dtype": str(dtype).removeprefix("torch."),
            "query_tokens": int(query.shape[0]),
            "documents": int(docs.shape[0]),
            "doc_tokens": int(n_tok),
            "gflop": gflop,
            "maxsim_ms": t_maxsim * 1e3,
            "matmul_ms": t_mm * 1e3,
            "maxsim_gflops": gflop / t_maxsim,
            "matmul_gflops": gflop / t_mm,
            "throughput_ratio": t_mm / t_maxsim,
            "max_abs_diff_vs_fp32_reference": float(np.abs(scores.numpy() - reference).max()),
        })
    return out


def median_seconds(fns: Sequence[Any], repeats: int) -> list[float]:
    """Median time of each function, run in alternation so that load from other processes hits
    all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return [float(np.median(t)) for t in times]


# --- helpers and output ----------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: in a child started by spawn or
    subprocess it begins at the parent's peak, which inflated the builds measured in children."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bytes_on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message} (peak RSS {peak_rss_mb():.0f} MB)", file=sys.stderr, flush=True)


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the server code differed from it."""

    def git(*argv: str) -> str:
        run = subprocess.run(["git", *argv], cwd=HERE.parent, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "server_code_modified": bool(git("status", "--porcelain", "--", "server"))}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        # Settings that change what is measured (thread pools, oneDNN caches, the allocator).
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "ONEDNN_", "DNNL_", "MALLOC_"))},
    }


def print_report(r: dict[str, Any], k: int) -> None:
    idx, ex = r["index"], r["exhaustive"]
    print(f"\ncolgrid search benchmark — {idx['documents']:,} documents, {idx['tokens']:,} tokens, "
          f"{idx['centroids']:,} centroids, {r['corpus']['queries']} queries, {r['machine']['cpu_count']} CPUs "
          f"({r['search_threads']} torch thread(s) per search, {r['machine']['torch_threads']} by default)")
    cached = " (cached build)" if idx["cached"] else ""
    print(f"build{cached}: encode {idx['encode_s']:.1f} s, index {idx['index_build_s']:.1f} s, "
          f"total {idx['build_total_s']:.1f} s, peak RSS {idx['peak_rss_mb']:.0f} MB; "
          f"on disk {idx['bytes_on_disk'] / 2**20:.1f} MiB; load {idx['load_s']:.1f} s")
    print(f"queries: encode {r['encoder']['query_encode_ms_mean']:.1f} ms/query (not in the latencies below); "
          f"search process peak RSS {r['peak_rss_search_mb']:.0f} MB")
    print(f"exhaustive exact MaxSim: mean {ex['mean_ms']:.1f} ms, p50 {ex['p50_ms']:.1f} ms, "
          f"p99 {ex['p99_ms']:.1f} ms, {ex['qps']:.2f} QPS{' (cached)' if ex['cached'] else ''}\n")
    head = f"{'nprobe':>6} {'n_cand':>7} {'recall@' + str(k):>9} {'mean ms':>8} {'p50 ms':>7} {'p99 ms':>7} {'QPS':>7} {'cands':>7} {'cand ms':>8} {'maxsim ms':>9}"
    print(head)
    print("-" * len(head))
    for s in r["sweep"]:
        default = "*" if (s["nprobe"], s["n_candidates"]) == (DEFAULT_NPROBE, DEFAULT_N_CANDIDATES) else " "
        print(f"{default}{s['nprobe']:>5} {s['n_candidates']:>7} {s[f'recall_at_{k}']:>9.3f} {s['mean_ms']:>8.1f} {s['p50_ms']:>7.1f} "
              f"{s['p99_ms']:>7.1f} {s['qps']:>7.1f} {s['candidates_mean']:>7.0f} {s['candidates_ms_mean']:>8.1f} {s['maxsim_ms_mean']:>9.1f}")
    print(f"* = the SearchParams defaults (nprobe={DEFAULT_NPROBE}, n_candidates={DEFAULT_N_CANDIDATES})")
    print("\nexact MaxSim kernel vs plain torch.mm of the same FLOPs and dtype")
    head = f"{'threads':>7} {'dtype':>9} {'shape (Q x docs x tokens)':>26} {'maxsim ms':>9} {'GFLOP/s':>8} {'matmul ms':>9} {'GFLOP/s':>8} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for m in r["maxsim_kernel"]:
        shape = f"{m['query_tokens']} x {m['documents']} x {m['doc_tokens']:,}"
        print(f"{m['threads']:>7} {m['dtype']:>9} {shape:>26} {m['maxsim_ms']:>9.1f} {m['maxsim_gflops']:>8.1f} {m['matmul_ms']:>9.1f} "
              f"{m['matmul_gflops']:>8.1f} {m['throughput_ratio']:>6.2f}")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents in the index")
    p.add_argument("--queries", type=int, default=200, help="queries (from held-out docstrings)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "search.json", help="JSON results file")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="cache: encoder, index, ground truth")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int_list, default=[1, 2, 4, 8, 16, 32], help="comma-separated")
    p.add_argument("--n-candidates", type=int_list, default=[64, 128, 256, 1024, 4096], help="comma-separated")
    p.add_argument("--batch-size", type=int, default=64, help="documents per encoder batch in the build")
    p.add_argument("--seed", type=int, default=0, help="corpus sample and kernel sample")
    p.add_argument("--warmup", type=int, default=5, help="queries run untimed before each setting")
    p.add_argument("--kernel-docs", type=int, default=1000, help="candidates in the MaxSim kernel measurement")
    p.add_argument("--kernel-repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: theirs)")
    p.add_argument("--search-threads", type=int, default=None, help="torch threads per search (default: Searcher's)")
    p.add_argument("--rescan", action="store_true", help="scan the installed sources again instead of reusing the saved corpus")
    p.add_argument("--rebuild", action="store_true", help="rebuild the index (reusing cached embeddings)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    work = args.work_dir.resolve()
    report: dict[str, Any] = {"machine": machine(), "code": code_version(), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    started = time.perf_counter()
    docs, queries, corpus_cached = cached_corpus(work, args.docs, args.queries, args.seed, args.rescan)
    log(f"corpus{' (cached)' if corpus_cached else ''}: {len(docs)} documents, {len(queries)} queries "
        f"({time.perf_counter() - started:.1f} s)")
    report["corpus"] = {
        "cached": corpus_cached,
        "roots": [str(r) for r in corpus_roots()],
        "documents": len(docs),
        "queries": len(queries),
        "query_kinds": dict(Counter(q.kind for q in queries)),
        "query_examples": [asdict(q) for q in queries[:8]],
    }
    rss = report["peak_rss_mb_by_phase"] = {"corpus": peak_rss_mb()}

    encoder_dir = ensure_default_encoder(work / "data")
    encoder = load_encoder(encoder_dir, threads=args.threads)
    version_dir, build = ensure_version(docs, work, encoder, encoder_dir, args)

    started = time.perf_counter()
    version = open_version(version_dir, verify=True, device="cpu")
    build.update(load_s=time.perf_counter() - started, path=str(version_dir), bytes_on_disk=bytes_on_disk(version_dir),
                 token_bytes=int(version.tokens.element_size() * version.tokens.nelement()))
    report["index"] = build
    rss["open_version"] = peak_rss_mb()

    started = time.perf_counter()
    encoded = encoder.encode_queries([q.text for q in queries])
    report["encoder"] = {"name": encoder.spec.name, "id": encoder.id, "dim": encoder.dim, "providers": encoder.providers,
                         "query_encode_ms_mean": (time.perf_counter() - started) * 1e3 / len(queries),
                         "query_tokens_mean": float(np.mean([q.vectors.shape[0] for q in encoded]))}

    searcher = Searcher(version) if args.search_threads is None else Searcher(version, threads=args.search_threads)
    report["search_threads"] = searcher.threads
    truth_key = digest([version.manifest_sha256, str(args.k), *(q.text for q in queries)])[:16]
    log("exhaustive exact MaxSim (ground truth)")
    truth = exhaustive_truth(searcher, encoded, args.k, work / "truth" / f"{truth_key}.json")
    report["exhaustive"] = {**latency_figures(truth["seconds"]), "cached": truth["cached"]}
    rss["exhaustive"] = peak_rss_mb()

    log("approximate search sweep")
    report["sweep"] = sweep(searcher, encoded, truth["top"], args.k, args.nprobe, args.n_candidates, args.warmup)
    rss["sweep"] = peak_rss_mb()
    log("MaxSim kernel")
    thread_counts = sorted({searcher.threads, torch.get_num_threads()})
    report["maxsim_kernel"] = maxsim_kernel(version, encoded, args.kernel_docs, args.kernel_repeats, args.seed, thread_counts)
    report["peak_rss_search_mb"] = rss["maxsim_kernel"] = peak_rss_mb()
    report["load_average_at_end"] = list(os.getloadavg())

    atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print_report(report, args.k)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
