"""P2: throughput of colgrid's exact MaxSim over a candidate set against the fastest plain matmul
of the same shapes on the same machine (CPU), and whether its top-10 equals a float64 reference.

    .venv/bin/python bench/bench_kernel.py [--dims 384,128] [--queries 100] [--out bench/results/kernel.json]

Shapes: 32 query tokens x 1,000 candidate documents of 100-1,000 tokens each (uniform), drawn
from a corpus of `--corpus-docs` documents of unit vectors stored as float16 (the layout an fp16
version serves): real MiniLM vectors when bench_codecs.py has cached some, else synthetic
text-like ones (see `Corpus`). Candidates are the documents whose mean vector is closest to the
query's, sorted by index, as candidate generation hands them over.

Timed, interleaved (each round runs every function once; medians over `--repeats` rounds), at
1 thread and at the machine's thread count:

- `exact_int8`: `exact_top_k` (what `Searcher` does) with the store's int8 screen
  (`open_version(screen=True)`): int8 pass with a proven per-document bound, then float32
  re-scoring of the documents that can still reach the top 10.
- `exact_bf16`: the same without a screen: bf16 pass (fp16 -> fp32 -> bf16 per block), bound,
  float32 re-scoring. `exact_fp32`: one float32 pass over every candidate.
- `screen_int8`, `maxsim_bf16`, `maxsim_fp32`: the passes alone.
- `mm_bf16`, `mm_fp32`: one torch.mm of the candidates' tokens, already concatenated,
  contiguous and in the matmul's dtype, (N, dim) x (dim, 32), into a preallocated output (the
  faster of with and without `out=`): the peak a MaxSim kernel is measured against.

Ratios are matmul time / kernel time of the same run (= kernel throughput / matmul
throughput for the same FLOPs, 2 * 32 * N * dim).

Accuracy: for `--queries` queries, the top 10 of `exact_top_k` (int8 screen, and bf16) against
the top 10 of float64 MaxSim on the stored vectors (ties to the lower index), as ordered lists.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colgrid_server.index import DenseTokens
from colgrid_server.search._maxsim import int8_screen_scores, maxsim_scores
from colgrid_server.search._searcher import exact_top_k

QUERY_TOKENS = 32
K = 10


class Corpus:
    """Float16 token vectors of `n_docs` documents of 100-1,000 tokens, and 32-token queries.

    `real`: MiniLM token vectors of docstrings cached by bench_codecs.py / bench_search.py
    (bench/.work): consecutive docstrings are concatenated into documents of the target
    lengths, and each query is the first 32 tokens of a held-out docstring (every 10th one is
    kept out of the corpus). At dims below 384 every vector is projected on the leading
    principal directions and re-normalised (a ColBERT-sized stand-in).

    `synthetic` (when nothing is cached): a Zipf vocabulary of word vectors in topics; a
    document draws half its tokens from the words of 3 topics and half from the whole
    vocabulary, each token its word plus context noise; a query is 32 words of one document,
    with fresh noise. Text-like: the best documents are those sharing the query's words."""

    def __init__(self, dim: int, n_docs: int, seed: int, source: str, work_dir: Path) -> None:
        self.dim = dim
        self.rng = np.random.default_rng(seed)
        self.lengths = self.rng.integers(100, 1001, size=n_docs)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        cached = _cached_vectors(work_dir) if source in ("auto", "real") else None
        if source == "real" and cached is None:
            raise SystemExit(f"no cached MiniLM vectors under {work_dir}: run bench_codecs.py first, or pass --data synthetic")
        self.source = "real" if cached is not None else "synthetic"
        if cached is not None:
            self.tokens, self._queries = self._real(cached)
        else:
            self.tokens, self._queries = self._synthetic()
        self.means = np.add.reduceat(self.tokens.float().numpy(), self.offsets[:-1], axis=0) / self.lengths[:, None]
        self.max_norm = float(self.tokens.float().norm(dim=1).max())

    def _real(self, directory: Path) -> tuple[torch.Tensor, list[np.ndarray]]:
        tokens = np.load(directory / "tokens.npy", mmap_mode="r")
        offsets = np.load(directory / "doc_offsets.npy")
        held = np.arange(offsets.shape[0] - 1) % 10 == 9
        corpus_docs = np.flatnonzero(~held)
        # Whole docstrings, in order, until each document reaches its target length.
        ends = np.cumsum(offsets[corpus_docs + 1] - offsets[corpus_docs])
        cut = np.searchsorted(ends, self.offsets[-1])
        if cut >= corpus_docs.shape[0]:
            raise SystemExit(f"{directory} holds fewer than {self.offsets[-1]} corpus tokens: lower --corpus-docs")
        rows = np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in corpus_docs[: cut + 1]])[: self.offsets[-1]]
        values = np.asarray(tokens[rows], dtype=np.float32)
        query_docs = [d for d in np.flatnonzero(held) if offsets[d + 1] - offsets[d] >= QUERY_TOKENS]
        queries = [np.asarray(tokens[offsets[d] : offsets[d] + QUERY_TOKENS], dtype=np.float32) for d in query_docs]
        if self.dim != values.shape[1]:
            sample = values[self.rng.choice(values.shape[0], size=min(50_000, values.shape[0]), replace=False)]
            _, _, vt = np.linalg.svd(sample - sample.mean(axis=0), full_matrices=False)
            basis = vt[: self.dim].T
            values = _unit(values @ basis)
            queries = [_unit(q @ basis) for q in queries]
        order = self.rng.permutation(len(queries))
        return torch.from_numpy(values.astype(np.float16)), [queries[i] for i in order]

    def _synthetic(self, words: int = 20_000, topics: int = 400) -> tuple[torch.Tensor, list[np.ndarray]]:
        rng, dim = self.rng, self.dim
        centres = _unit(rng.standard_normal((topics, dim), dtype=np.float32))
        word_topic = np.arange(words) % topics
        vocabulary = _unit(centres[word_topic] + rng.standard_normal((words, dim), dtype=np.float32) / np.sqrt(dim))
        zipf = 1.0 / np.arange(1, words + 1) ** 1.1
        zipf /= zipf.sum()
        n_tok = int(self.offsets[-1])
        doc_topics = rng.integers(0, topics, size=(self.lengths.shape[0], 3))
        own = doc_topics[np.repeat(np.arange(self.lengths.shape[0]), self.lengths), rng.integers(0, 3, size=n_tok)]
        topical = own + topics * rng.integers(0, words // topics, size=n_tok)
        background = rng.choice(words, size=n_tok, p=zipf)
        self.word_ids = np.where(rng.random(n_tok) < 0.5, topical, background)
        tokens = torch.empty((n_tok, dim), dtype=torch.float16)
        for start in range(0, n_tok, 1 << 16):
            ids = self.word_ids[start : start + (1 << 16)]
            noise = 0.35 * rng.standard_normal((ids.shape[0], dim), dtype=np.float32) / np.sqrt(dim)
            tokens[start : start + ids.shape[0]] = torch.from_numpy(_unit(vocabulary[ids] + noise))
        queries = []
        for d in rng.integers(0, self.lengths.shape[0], size=1000):
            ids = rng.choice(self.word_ids[self.offsets[d] : self.offsets[d + 1]], size=QUERY_TOKENS, replace=False)
            noise = 0.35 * rng.standard_normal((QUERY_TOKENS, dim), dtype=np.float32) / np.sqrt(dim)
            queries.append(_unit(vocabulary[ids] + noise))
        return tokens, queries

    def queries(self, n: int) -> list[np.ndarray]:
        if n > len(self._queries):
            raise SystemExit(f"only {len(self._queries)} queries available, asked for {n}")
        return self._queries[:n]

    def candidates(self, query: np.ndarray, n: int) -> np.ndarray:
        return np.sort(np.argsort(-(self.means @ query.mean(axis=0)), kind="stable")[:n])

    def rows(self, docs: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.arange(self.offsets[d], self.offsets[d + 1]) for d in docs]))


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cached_vectors(work_dir: Path) -> Path | None:
    """The largest cached vector set (bench_codecs.py layout: tokens.npy, doc_offsets.npy)."""
    found = sorted(work_dir.glob("codecs/*/vectors/tokens.npy"), key=lambda p: p.stat().st_size)
    return found[-1].parent if found else None


def reference_top_k(corpus: Corpus, query: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 MaxSim top k (ties to the lower index), with code independent of colgrid's: a
    float32 matmul and numpy segment maxima shortlist every document within 1e-3 of the k-th
    (float32 errors here are ~1e-5), then float64 on the shortlist."""
    lengths = corpus.offsets[docs + 1] - corpus.offsets[docs]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    gathered = corpus.tokens.index_select(0, corpus.rows(docs))
    approx = np.maximum.reduceat((gathered.float() @ torch.from_numpy(query).T).numpy(), starts, axis=0).sum(axis=1)
    shortlist = np.flatnonzero(approx >= np.partition(approx, -k)[-k] - 1e-3)
    q64 = query.astype(np.float64)
    exact = np.array([
        (gathered[starts[i] : starts[i] + lengths[i]].numpy().astype(np.float64) @ q64.T).max(axis=0).sum() for i in shortlist
    ])
    order = np.lexsort((docs[shortlist], -exact))[:k]
    return docs[shortlist][order], exact[order]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up: oneDNN kernels for the block shapes, allocator
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def timing(corpus: Corpus, plain: DenseTokens, screened: DenseTokens, query: np.ndarray, docs: np.ndarray,
           threads: int, repeats: int) -> dict[str, Any]:
    q = torch.from_numpy(query)
    offsets = corpus.offsets
    gathered16 = corpus.tokens.index_select(0, corpus.rows(docs))
    n_tok, dim = gathered16.shape
    # The documents the int8 path scores exactly, for timing a whole-document float32 re-score of them.
    kept_docs = exact_top_k(q, screened, offsets, docs, K, fast_pass=True).scored
    screen = screened.screen
    assert screen is not None
    fns: dict[str, Callable[[], Any]] = {
        "exact_int8": lambda: exact_top_k(q, screened, offsets, docs, K, fast_pass=True),
        "exact_bf16": lambda: exact_top_k(q, plain, offsets, docs, K, fast_pass=True),
        "exact_fp32": lambda: exact_top_k(q, plain, offsets, docs, K, fast_pass=False),
        "screen_int8": lambda: int8_screen_scores(q, screen, offsets, docs, max_token_norm=screened.max_norm),
        "rescore_fp32": lambda: maxsim_scores(q, plain, offsets, kept_docs),
        "maxsim_bf16": lambda: maxsim_scores(q, plain, offsets, docs, compute_dtype=torch.bfloat16),
        "maxsim_fp32": lambda: maxsim_scores(q, plain, offsets, docs),
    }
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = gathered16.to(dtype).contiguous()
        b = q.T.to(dtype).contiguous()
        out = torch.empty((n_tok, QUERY_TOKENS), dtype=dtype)
        fns[f"mm_{name}"] = lambda a=a, b=b: torch.mm(a, b)
        fns[f"mm_{name}_out"] = lambda a=a, b=b, out=out: torch.mm(a, b, out=out)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = interleaved(fns, repeats)
    finally:
        torch.set_num_threads(before)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    best = {name: min(t) * 1e3 for name, t in times.items()}
    peak = {dtype: min(med[f"mm_{dtype}"], med[f"mm_{dtype}_out"]) for dtype in ("bf16", "fp32")}
    gflop = 2.0 * QUERY_TOKENS * n_tok * dim / 1e9
    return {
        "threads": threads,
        "doc_tokens": int(n_tok),
        "gflop": gflop,
        "median_ms": med,
        "min_ms": best,
        "peak_ms": peak,
        "peak_gflops": {d: gflop / (ms / 1e3) for d, ms in peak.items()},
        "rescored_docs": int(kept_docs.shape[0]),
        "rescored_tokens": int((offsets[kept_docs + 1] - offsets[kept_docs]).sum()),
        "ratios": {
            "exact_int8_vs_mm_bf16": peak["bf16"] / med["exact_int8"],
            "exact_bf16_vs_mm_bf16": peak["bf16"] / med["exact_bf16"],
            "exact_fp32_vs_mm_bf16": peak["bf16"] / med["exact_fp32"],
            "screen_int8_vs_mm_bf16": peak["bf16"] / med["screen_int8"],
            "maxsim_bf16_vs_mm_bf16": peak["bf16"] / med["maxsim_bf16"],
            "maxsim_fp32_vs_mm_fp32": peak["fp32"] / med["maxsim_fp32"],
            "exact_int8_vs_mm_fp32": peak["fp32"] / med["exact_int8"],
        },
    }


def accuracy(corpus: Corpus, plain: DenseTokens, screened: DenseTokens, queries: Sequence[np.ndarray], n_candidates: int) -> dict[str, Any]:
    equal = {"exact_int8": 0, "exact_bf16": 0}
    max_diff = {"exact_int8": 0.0, "exact_bf16": 0.0}
    rescored: list[int] = []
    for query in queries:
        docs = corpus.candidates(query, n_candidates)
        ref_docs, ref_scores = reference_top_k(corpus, query, docs, K)
        q = torch.from_numpy(query)
        for name, store in (("exact_int8", screened), ("exact_bf16", plain)):
            top = exact_top_k(q, store, corpus.offsets, docs, K, fast_pass=True)
            equal[name] += int(np.array_equal(top.docs, ref_docs))
            if np.array_equal(top.docs, ref_docs):
                max_diff[name] = max(max_diff[name], float(np.abs(top.scores - ref_scores).max()))
            if name == "exact_int8":
                rescored.append(top.rescored)
    n = len(queries)
    return {
        "queries": n,
        "top10_equal_rate": {name: count / n for name, count in equal.items()},
        "max_abs_score_diff_vs_float64": max_diff,
        "rescored_docs_int8": {"mean": float(np.mean(rescored)), "p50": float(np.median(rescored)), "max": int(np.max(rescored))},
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "ONEDNN_", "DNNL_"))},
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="384,128", help="comma-separated token dims (MiniLM 384, ColBERT 128)")
    p.add_argument("--corpus-docs", type=int, default=2000, help="documents in the stored corpus")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--queries", type=int, default=100, help="queries for the top-10 check")
    p.add_argument("--timing-queries", type=int, default=2, help="queries (candidate sets) timed")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds per timing")
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                   help="auto: cached MiniLM vectors if bench_codecs.py left some in --work-dir, else synthetic")
    p.add_argument("--work-dir", type=Path, default=Path("bench/.work"))
    p.add_argument("--out", type=Path, default=Path("bench/results/kernel.json"))
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
    default_threads = torch.get_num_threads()
    report: dict[str, Any] = {"machine": machine(), "query_tokens": QUERY_TOKENS, "k": K,
                              "candidates": args.candidates, "corpus_docs": args.corpus_docs, "dims": {}}
    for dim in (int(d) for d in args.dims.split(",")):
        started = time.perf_counter()
        corpus = Corpus(dim, args.corpus_docs, args.seed, args.data, args.work_dir)
        plain = DenseTokens(corpus.tokens, codec="fp16", max_norm=corpus.max_norm)
        built = time.perf_counter()
        screened = plain.with_screen(corpus.offsets)
        screen_s = time.perf_counter() - built
        print(f"dim {dim}: {corpus.source} corpus, {corpus.tokens.shape[0]} tokens in {built - started:.0f} s, "
              f"screen built in {screen_s:.1f} s", file=sys.stderr)
        queries = corpus.queries(args.queries)
        rows = []
        for t in threads:
            for query in queries[: args.timing_queries]:
                row = timing(corpus, plain, screened, query, corpus.candidates(query, args.candidates), t, args.repeats)
                rows.append(row)
                print(f"  threads {t}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["ratios"].items()), file=sys.stderr)
        torch.set_num_threads(1)  # as a Searcher runs; several threads only slow these small ops on a busy host
        try:
            acc = accuracy(corpus, plain, screened, queries, args.candidates)
        finally:
            torch.set_num_threads(default_threads)
        print(f"  accuracy: {acc['top10_equal_rate']}, rescored {acc['rescored_docs_int8']}", file=sys.stderr)
        report["dims"][str(dim)] = {"data": corpus.source, "corpus_tokens": int(corpus.tokens.shape[0]), "screen_build_s": screen_s,
                                    "screen_bytes": screened.screen.nbytes if screened.screen else 0,
                                    "timing": rows, "accuracy": acc}
        del corpus, plain, screened
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
