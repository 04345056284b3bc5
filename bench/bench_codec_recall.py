"""Codec recall benchmark: a compressed codec's recall@10 loss against its fp16 twin, with
bootstrap error bars, on three query sets over the same indexed documents. Not part of CI.

    .venv/bin/python bench/bench_codec_recall.py [--docs 20000] [--new-queries 700] \
        [--codecs fp16,entropy4] [--out bench/results/codec-recall-20k.json]

Query sets (all against bench_codecs.py's cached documents and versions; run bench_codecs.py
with the same --docs first):
  A  bench_codecs.py's held-out queries (its vectors/queries.npy),
  B  bench_search.py's split, as exported by bench_fastplaid.py (fastplaid/<version>/vectors),
  C  --new-queries further held-out docstrings (seeded shuffle of the documents neither indexed
     nor B's sources; texts not in A or B), encoded by the cached encoder and cached.

Per set: ground truth is fp16's exhaustive top-100 (cached). Per codec: recall@10 at default
SearchParams(k=10); the loss against fp16, paired per query, with a bootstrap standard error
over queries; the same duplicate-aware (identical documents count as one another); and the
exhaustive ceiling, taken as fp16's exhaustive top-100 reranked by the codec's exact MaxSim
(on 20k documents and A this matched the codec's true exhaustive search, 0.988 both). Near
ties: the share of queries whose fp16 rank-10 minus rank-11 score is under --tie-gap, and the
number with an exact tie there (which of the two makes the top 10 is arbitrary).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from colgrid_server.corpus import iter_docstring_documents
from colgrid_server.documents import read_jsonl
from colgrid_server.encoders import load_encoder
from colgrid_server.index import LoadedVersion, version_exists
from colgrid_server.search import SearchParams, Searcher, maxsim_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_codecs as bc  # noqa: E402  (cache layout, recall and loss helpers)
import bench_search as bs  # noqa: E402  (the corpus split and query making)

HERE = Path(__file__).resolve().parent
K = bc.K
TRUTH_K = 100
NEW_QUERY_SEED = 7  # the scratch evaluation's seed: keeps set C (and its cache) the same


# --- query sets ------------------------------------------------------------------------------


def codec_cache(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """bench_codecs.py's cache directory for --docs (its default 100 queries, seed 0)."""
    ns = argparse.Namespace(source="auto", docs=args.docs, queries=args.a_queries, seed=0, dim=128, normalized=False)
    cached = bc.largest_cached_version(work / "versions")
    if cached is None:
        sys.exit(f"no cached bench_search version under {work / 'versions'}: run bench_search.py, then bench_codecs.py --docs {args.docs}")
    source, info, cache = bc.prepare_source(ns, work)
    return cache, info


def new_queries(work: Path, info: dict[str, Any], a_texts: set[str], b_queries: list[bs.Query], n: int) -> list[str]:
    """n held-out query texts made as bench_search.py makes its own, from a seeded shuffle of
    the documents that are neither indexed nor B's sources; no text of A or B again."""
    indexed = {d.id for d in read_jsonl(corpus_base(work, info, len(b_queries)).with_suffix(".docs.jsonl"))}
    used = indexed | {q.source_id for q in b_queries}
    texts_used = a_texts | {q.text for q in b_queries}
    candidates = [d for d in iter_docstring_documents(bs.corpus_roots()) if d.id not in used]
    random.Random(NEW_QUERY_SEED).shuffle(candidates)
    texts: list[str] = []
    for doc in candidates:
        if len(texts) == n:
            break
        text = bs.name_phrase(doc.id) if len(texts) % 4 == 3 else bs.first_sentence(doc.text)
        if text and text not in texts_used:
            texts_used.add(text)
            texts.append(text)
    if len(texts) < n:
        sys.exit(f"only {len(texts)} usable new held-out docstrings for --new-queries {n}")
    return texts


def corpus_base(work: Path, info: dict[str, Any], n_b: int) -> Path:
    return work / "corpus" / f"{info['documents']}docs-{n_b}queries-seed0"


def encoder_dir(work: Path, encoder_id: str) -> Path:
    """The cached encoder the indexed documents were encoded with (bench_search.py exports it)."""
    root = work / "data" / "encoders"
    found = next((p for p in sorted(root.glob("*")) if p.is_dir() and load_encoder(p).id == encoder_id), None)
    if found is None:
        sys.exit(f"no encoder with id {encoder_id} under {root}: rerun bench_search.py")
    return found


def query_sets(args: argparse.Namespace, work: Path, cache: Path, info: dict[str, Any], out: Path) -> dict[str, list[np.ndarray]]:
    vectors_b = work / "fastplaid" / Path(info["version"]).name / "vectors"
    if not (vectors_b / "queries.npy").is_file():
        sys.exit(f"{vectors_b} has no queries.npy: run bench_fastplaid.py (it exports bench_search.py's queries) first")
    if (vectors_b / "doc_ids.txt").read_text() != (cache / "vectors" / "doc_ids.txt").read_text():
        sys.exit(f"{vectors_b} indexes other documents than {cache / 'vectors'}")
    b_vectors = bc.read_queries(vectors_b)
    base = corpus_base(work, info, len(b_vectors))
    b_queries = [bs.Query(**q) for q in json.loads(base.with_suffix(".queries.json").read_text(encoding="utf-8"))]
    c_path, c_texts_path = out / f"C-{args.new_queries}.npz", out / f"C-{args.new_queries}.json"
    if not c_path.is_file():
        bc.log(f"making and encoding {args.new_queries} new held-out queries (set C)")
        texts = new_queries(work, info, set(json.loads((cache / "vectors" / "source.json").read_text())["query_texts"]),
                            b_queries, args.new_queries)  # fmt: skip
        encoder = load_encoder(encoder_dir(work, info["encoder"]))
        check = [e.vectors for e in encoder.encode_queries([q.text for q in b_queries[:3]])]
        if max(float(np.abs(x - y).max()) for x, y in zip(check, b_vectors)) > 1e-4:
            sys.exit("the cached encoder does not reproduce B's query vectors: set C would not be comparable")
        c = [e.vectors.astype(np.float32) for e in encoder.encode_queries(texts)]
        np.savez(c_path, *c)
        bc.atomic_write(c_texts_path, json.dumps(texts, ensure_ascii=False))
    with np.load(c_path) as z:
        c_vectors = [np.ascontiguousarray(z[f"arr_{i}"], dtype=np.float32) for i in range(len(z.files))]
    return {"A": bc.read_queries(cache / "vectors"), "B": b_vectors, "C": c_vectors}


# --- measuring -------------------------------------------------------------------------------


def fp16_truth(fp16: Searcher, name: str, queries: list[np.ndarray], out: Path) -> dict[str, list[list[Any]]]:
    """fp16's exhaustive top-100 ids and scores per query (cached: the slow part)."""
    path = out / f"truth_{name}_{len(queries)}q.json"
    if not path.is_file():
        bc.log(f"fp16 exhaustive top-{TRUTH_K} of set {name} ({len(queries)} queries)")
        hits = [fp16.exhaustive(q, [""] * q.shape[0], SearchParams(k=TRUTH_K)).hits for q in queries]
        bc.atomic_write(path, json.dumps({"ids": [[h.doc_id for h in hs] for hs in hits], "scores": [[h.score for h in hs] for hs in hits]}))
    return json.loads(path.read_text())


def reranked_top(version: LoadedVersion, index: dict[str, int], query: np.ndarray, candidates: list[str]) -> list[str]:
    """Top 10 of fp16's exhaustive top 100 by this version's exact MaxSim (stable: fp16 order breaks ties)."""
    docs = np.array([index[d] for d in candidates], dtype=np.int64)
    scores = maxsim_scores(torch.from_numpy(query), version.store, version.doc_offsets, docs).numpy()
    return [candidates[i] for i in np.argsort(-scores, kind="stable")[:K]]


def near_ties(scores: list[list[float]], gap: float) -> dict[str, Any]:
    gaps = np.array([s[K - 1] - s[K] for s in scores])
    return {"gap_threshold": gap, "share_below": float((gaps < gap).mean()), "exact_ties": int((gaps == 0).sum()),
            "gap_quantiles": {str(q): float(v) for q, v in zip((0.05, 0.1, 0.25, 0.5), np.quantile(gaps, [0.05, 0.1, 0.25, 0.5]))}}  # fmt: skip


def measure_codec(path: Path, sets: dict[str, list[np.ndarray]], truth: dict[str, dict[str, list[list[Any]]]]) -> dict[str, dict[str, list[list[str]]]]:
    """Per set: default-search top 10 and reranked ('exhaustive') top 10 of every query."""
    version, _ = bc.load(path, keep_codes=False)
    searcher, index = Searcher(version), {d: i for i, d in enumerate(version.doc_ids)}
    found: dict[str, dict[str, list[list[str]]]] = {}
    for name, queries in sets.items():
        found[name] = {"default": [bc.top_ids(searcher, q) for q in queries],
                       "exhaustive": [reranked_top(version, index, q, ids) for q, ids in zip(queries, truth[name]["ids"])]}  # fmt: skip
    version.close()
    return found


def figures(found: dict[str, dict[str, list[list[str]]]], top10: list[list[str]], keys: dict[str, str]) -> dict[str, Any]:
    """Recall@10 of fp16 and every codec on one set, and each codec's losses against fp16."""
    per_query = {c: {m: bc.per_query_recall(f[m], top10) for m in f} for c, f in found.items()}
    dup = {c: bc.per_query_recall(f["default"], top10, keys) for c, f in found.items()}
    out: dict[str, Any] = {}
    for codec, r in per_query.items():
        out[codec] = {"recall_at_10": float(r["default"].mean()), "exhaustive_recall_at_10": float(r["exhaustive"].mean()),
                      "duplicate_aware_recall_at_10": float(dup[codec].mean())}  # fmt: skip
        if codec != "fp16":
            out[codec]["recall_loss_vs_fp16"] = bc.loss_with_error(per_query["fp16"]["default"], r["default"])
            out[codec]["recall_loss_vs_fp16_duplicate_aware"] = bc.loss_with_error(dup["fp16"], dup[codec])
            out[codec]["exhaustive_recall_loss"] = bc.loss_with_error(per_query["fp16"]["exhaustive"], r["exhaustive"])
    return out


# --- report ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    m, src = report["machine"], report["source"]
    print(f"\ncolgrid codec recall — {src['documents']:,} documents, {src['tokens']:,} tokens of dim {src['dim']}, "
          f"{m['cpu']} × {m['cpu_count']}, load {m['load_average_at_start'][0]:.1f}, {report['runtime_s']:.0f} s")  # fmt: skip
    head = f"{'set':>3} {'queries':>7} {'codec':>9} {'B/tok':>6} {'recall@10':>9} {'loss ± se':>16} {'dup-aware loss':>16} {'exh. recall':>11} {'exh. loss ± se':>16}"
    print(head)
    for name, s in report["sets"].items():
        for codec, f in s["codecs"].items():
            print(f"{name:>3} {s['queries']:>7} {codec:>9} {report['bytes_per_token'][codec]:>6.1f} {f['recall_at_10']:>9.4f} "
                  f"{bc._loss(f.get('recall_loss_vs_fp16')):>16} {bc._loss(f.get('recall_loss_vs_fp16_duplicate_aware')):>16} "
                  f"{f['exhaustive_recall_at_10']:>11.4f} {bc._loss(f.get('exhaustive_recall_loss')):>16}")  # fmt: skip
    print(f"\n{'set':>3}  near ties at rank 10 (fp16 rank-10 minus rank-11 score)")
    for name, s in report["sets"].items():
        t = s["near_ties"]
        print(f"{name:>3}  gap < {t['gap_threshold']}: {t['share_below']:.3f} of queries; exact ties: {t['exact_ties']}")
    print("\nB/tok: token payload per token. recall@10: default SearchParams(k=10) against fp16's exhaustive top-10; "
          "loss: fp16's minus the codec's, paired per query, ± bootstrap standard error over queries (2000 resamples, seed 0); "
          "dup-aware: identical documents count as one another; exh.: fp16's exhaustive top-100 reranked by the codec's exact MaxSim.")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    work = args.work_dir.resolve()
    report: dict[str, Any] = {"command": command_line(argv),
                              "machine": bc.machine(), "code": bc.code_version(), "config": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    cache, info = codec_cache(args, work)
    report["source"] = {k: v for k, v in info.items() if k != "query_texts"}
    codecs = ["fp16", *[c for c in args.codecs if c != "fp16"]]
    paths = {c: cache / "versions" / c for c in codecs}
    if missing := [c for c, p in paths.items() if not version_exists(p)]:
        sys.exit(f"no cached {', '.join(missing)} version under {cache / 'versions'}: run "
                 f".venv/bin/python bench/bench_codecs.py --docs {args.docs} --codecs {','.join(codecs)} first")  # fmt: skip
    report["bytes_per_token"] = {c: bc.storage(p, c, info["tokens"])["payload_bytes_per_token"] for c, p in paths.items()}
    out = work / "codec-recall" / cache.name
    out.mkdir(parents=True, exist_ok=True)
    sets = query_sets(args, work, cache, info, out)

    fp16_version, _ = bc.load(paths["fp16"], keep_codes=False)
    truth = {name: fp16_truth(Searcher(fp16_version), name, queries, out) for name, queries in sets.items()}
    fp16_version.close()
    found = {}
    for codec in codecs:
        bc.log(f"default search and reranking on {codec}")
        found[codec] = measure_codec(paths[codec], sets, truth)
    keys = bc.content_keys(cache / "vectors")
    report["sets"] = {}
    for name, queries in sets.items():
        top10 = [ids[:K] for ids in truth[name]["ids"]]
        report["sets"][name] = {"queries": len(queries), "near_ties": near_ties(truth[name]["scores"], args.tie_gap),
                                "codecs": figures({c: found[c][name] for c in codecs}, top10, keys)}  # fmt: skip
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["peak_rss_mb"] = bc.peak_rss_mb()
    report["runtime_s"] = time.perf_counter() - started
    bc.atomic_write(args.out, json.dumps(report, indent=1))
    print_report(report)
    print(f"\nwritten to {args.out}")
    return report


def command_line(argv: Sequence[str] | None) -> str:
    exe = Path(sys.executable)
    exe_text = str(exe.relative_to(HERE.parent)) if exe.is_relative_to(HERE.parent) else str(exe)
    return " ".join([exe_text, *sys.argv] if argv is None else [exe_text, "bench/bench_codec_recall.py", *argv])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents: bench_codecs.py's --docs")
    p.add_argument("--a-queries", type=int, default=100, help="bench_codecs.py's --queries (set A)")
    p.add_argument("--new-queries", type=int, default=700, help="new held-out queries (set C)")
    p.add_argument("--codecs", type=lambda s: [c for c in s.split(",") if c], default=["fp16", "entropy4"])
    p.add_argument("--tie-gap", type=float, default=0.005, help="a rank-10 minus rank-11 score gap under this is a near tie")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work")
    p.add_argument("--out", type=Path, default=HERE / "results" / "codec-recall-20k.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
