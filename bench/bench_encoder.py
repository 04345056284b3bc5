"""P3: the bundled MiniLM encoder on the CPU — ONNX Runtime (as served, with other session
options, the transformer-fused graph, IO binding) against PyTorch eager on the same model and the
same batches, and int8 dynamic quantisation with its cost in cosine and in recall@10. Not part of
CI.

    .venv/bin/python bench/bench_encoder.py [--threads 1,2] [--out bench/results/encoder.json]

Workloads: one batch of 32 real docstrings of 180-230 tokens (padded to the longest), single
queries (batch 1, bench_search.py's held-out queries) and one batch of 32 queries. Every variant
runs each workload in turn, repeat after repeat, so that load from other processes falls on all
alike. Recall: --recall-docs docstrings and their held-out queries encoded by the fp32 and the
int8 encoder through colgrid's own TextEncoder; exhaustive exact MaxSim top-10 of each against
fp32's. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _encoder_models as em  # noqa: E402
import bench_search as bs  # noqa: E402

from colgrid_server.documents import Document  # noqa: E402
from colgrid_server.encoders import ensure_default_encoder, load_encoder  # noqa: E402
from colgrid_server.encoders._tokenize import TextTokenizer, pad_batch  # noqa: E402
from colgrid_server.encoders.spec import load_spec  # noqa: E402

HERE = Path(__file__).resolve().parent


# --- workloads -------------------------------------------------------------------------------


def workloads(encoder_dir: Path, docs: list[Document], query_texts: list[str], args: argparse.Namespace) -> dict[str, list[em.Batch]]:
    spec = load_spec(encoder_dir)
    tokenizer_json = (encoder_dir / spec.tokenizer_file).read_text(encoding="utf-8")
    common = {"mask_token": spec.mask_token, "skip_special_tokens": spec.skip_special_tokens}
    doc_tok = TextTokenizer(tokenizer_json, max_length=spec.document_max_length, marker=spec.document_marker, augment=False, **common)
    query_tok = TextTokenizer(tokenizer_json, max_length=spec.query_max_length, marker=spec.query_marker,
                              augment=spec.query_augment, **common)  # fmt: skip
    chosen = []
    for doc in docs:
        item = doc_tok.tokenize([doc.text])[0]
        if args.doc_min_tokens <= len(item.ids) <= args.doc_max_tokens:
            chosen.append(item)
            if len(chosen) == args.doc_batch:
                break
    queries = query_tok.tokenize(query_texts)
    return {
        f"{args.doc_batch} documents": [pad_batch(chosen, doc_tok.pad_id)],
        "1 query": [pad_batch([q], query_tok.pad_id) for q in queries[: args.single_queries]],
        f"{args.doc_batch} queries": [pad_batch(queries[: args.doc_batch], query_tok.pad_id)],
    }


def shape(batches: list[em.Batch]) -> dict[str, Any]:
    mask = [b["attention_mask"] for b in batches]
    return {"batches": len(batches), "batch_size": int(mask[0].shape[0]),
            "padded_length_mean": float(np.mean([m.shape[1] for m in mask])),
            "real_tokens_mean": float(np.mean([m.sum(1).mean() for m in mask]))}  # fmt: skip


def time_variants(runners: dict[str, em.Runner], batches: list[em.Batch], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per batch of each variant: every variant runs the whole workload once per repeat,
    in turn. A pause between variants lets the previous one's spinning threads go idle."""
    for run in runners.values():
        run(batches[0])  # warm-up: allocations, kernel selection
    per: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            time.sleep(0.05)
            started = time.perf_counter()
            for batch in batches:
                run(batch)
            per[name].append((time.perf_counter() - started) / len(batches))
    return {name: {"median_ms": float(np.median(s)) * 1e3, "min_ms": float(np.min(s)) * 1e3, "mean_ms": float(np.mean(s)) * 1e3}
            for name, s in per.items()}  # fmt: skip


def agreement(runners: dict[str, em.Runner], batch: em.Batch) -> dict[str, dict[str, float]]:
    """Per real token, cosine of each variant's vector to torch eager's (the model itself)."""
    reference = runners["torch eager"](batch)
    real = batch["attention_mask"].astype(bool)
    out = {}
    for name, run in runners.items():
        got = run(batch)
        cos = np.sum(got * reference, axis=-1)[real] / np.maximum(
            np.linalg.norm(got, axis=-1)[real] * np.linalg.norm(reference, axis=-1)[real], 1e-12)
        out[name] = {"min_cosine": float(cos.min()), "p1_cosine": float(np.percentile(cos, 1)), "mean_cosine": float(cos.mean()),
                     "max_abs_diff": float(np.abs(got - reference)[real].max())}  # fmt: skip
    return out


# --- recall cost of int8 ---------------------------------------------------------------------


def maxsim_top(doc_vectors: list[np.ndarray], query_vectors: list[np.ndarray], k: int) -> np.ndarray:
    """Exact MaxSim top-k document indices per query (float32), documents in blocks."""
    q_all = torch.from_numpy(np.concatenate(query_vectors).astype(np.float32))
    q_starts = np.concatenate([[0], np.cumsum([q.shape[0] for q in query_vectors])[:-1]])
    scores = np.empty((len(doc_vectors), len(query_vectors)), dtype=np.float32)
    for lo in range(0, len(doc_vectors), 256):
        block = doc_vectors[lo:lo + 256]
        d = torch.from_numpy(np.concatenate(block).astype(np.float32))
        sims = (d @ q_all.T).numpy()
        starts = np.concatenate([[0], np.cumsum([b.shape[0] for b in block])[:-1]])
        per_doc = np.maximum.reduceat(sims, starts, axis=0)  # (docs, query tokens)
        scores[lo:lo + len(block)] = np.add.reduceat(per_doc, q_starts, axis=1)
    return np.argsort(-scores, axis=0, kind="stable")[:k].T


def recall_cost(encoder_dir: Path, graphs: em.Graphs, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    docs, queries, _ = bs.cached_corpus(work, args.recall_docs, args.recall_queries, args.seed, False)
    texts, query_texts = [d.text for d in docs], [q.text for q in queries]
    graph_of = {"fp32 fused": graphs.fused, "int8": graphs.int8["int8"], "int8 fused": graphs.int8["int8-fused"]}
    dirs = {"fp32": encoder_dir}
    for name in args.recall_variants:
        dirs[name] = em.encoder_dir_with(encoder_dir, graph_of[name], work / "encoder-bench" / f"encoder-{name.replace(' ', '-')}")
    encoded: dict[str, dict[str, Any]] = {}
    for name, path in dirs.items():
        encoder = load_encoder(path, threads=args.encode_threads)
        bs.log(f"recall: encoding {len(texts)} documents with {name}")
        started = time.perf_counter()
        d = encoder.encode_documents(texts)
        doc_s = time.perf_counter() - started
        q = encoder.encode_queries(query_texts)
        encoded[name] = {"docs": [e.vectors for e in d], "queries": [e.vectors for e in q], "encode_documents_s": doc_s}
    reference = encoded["fp32"]
    top_ref = maxsim_top(reference["docs"], reference["queries"], args.k)
    tokens = sum(v.shape[0] for v in reference["docs"])
    out: dict[str, Any] = {"documents": len(texts), "tokens": tokens, "queries": len(query_texts), "variants": {}}
    for name, e in encoded.items():
        cos = np.concatenate([np.sum(a * b, axis=1) for a, b in zip(e["docs"], reference["docs"])])
        row = {"encode_documents_s": e["encode_documents_s"], "documents_per_s": len(texts) / e["encode_documents_s"],
               "doc_token_cosine_to_fp32": {"min": float(cos.min()), "p1": float(np.percentile(cos, 1)), "mean": float(cos.mean())}}  # fmt: skip
        if name != "fp32":
            top = maxsim_top(e["docs"], e["queries"], args.k)
            both = [len(set(a) & set(b)) / args.k for a, b in zip(top, top_ref)]
            # Documents encoded by the variant, queries by fp32: the cost of re-encoding only one side.
            mixed = maxsim_top(e["docs"], reference["queries"], args.k)
            row[f"recall_at_{args.k}"] = float(np.mean(both))
            row[f"recall_at_{args.k}_fp32_queries"] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(mixed, top_ref)]))
        out["variants"][name] = row
    return out


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=bs.int_list, default=sorted({1, os.cpu_count() or 1}), help="thread counts, comma-separated")
    p.add_argument("--doc-batch", type=int, default=32)
    p.add_argument("--doc-min-tokens", type=int, default=180)
    p.add_argument("--doc-max-tokens", type=int, default=230)
    p.add_argument("--single-queries", type=int, default=50, help="single queries timed per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recall-docs", type=int, default=3000)
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--recall-variants", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=["int8"],
                   help="encoders compared with fp32 end to end: any of 'fp32 fused', 'int8', 'int8 fused' (comma-separated)")
    p.add_argument("--encode-threads", type=int, default=None, help="ORT threads of the recall encoders (default: ORT's)")
    p.add_argument("--no-recall", action="store_true")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=20000, help="bench_search.py's corpus split the timed texts come from")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--work-dir", type=Path, default=HERE / ".work")
    p.add_argument("--out", type=Path, default=HERE / "results" / "encoder.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import onnxruntime as ort
    import transformers

    report: dict[str, Any] = {"machine": bs.machine(), "code": bs.code_version(),
                              "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
                              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}  # fmt: skip
    encoder_dir = ensure_default_encoder(work / "data")
    graphs = em.prepare_graphs(encoder_dir, work / "encoder-bench")
    report["graphs"] = {"exported": graphs.exported.stat().st_size, "fused": graphs.fused.stat().st_size,
                        **{name: p.stat().st_size for name, p in graphs.int8.items()}}  # fmt: skip
    docs, queries, _ = bs.cached_corpus(work, args.docs, args.queries, args.seed, False)
    loads = workloads(encoder_dir, docs, [q.text for q in queries], args)
    report["workloads"] = {name: shape(b) for name, b in loads.items()}

    report["timing"] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = em.variants(graphs, threads)
        if "agreement" not in report:
            report["agreement"] = agreement(runners, loads[f"{args.doc_batch} documents"][0])
            per_tensor = em.ort_runner(em.ort_session(graphs.int8["int8-per-tensor"], threads))
            report["agreement"]["ort int8 per-tensor (not timed)"] = agreement(
                {"torch eager": runners["torch eager"], "x": per_tensor}, loads[f"{args.doc_batch} documents"][0])["x"]
        for name, batches in loads.items():
            bs.log(f"timing {name} at {threads} thread(s)")
            rows = time_variants(runners, batches, args.repeats)
            report["timing"].setdefault(str(threads), {})[name] = {"variants": rows, **speedups(rows)}
        del runners
    if not args.no_recall:
        report["recall"] = recall_cost(encoder_dir, graphs, work, args)
    report["load_average_at_end"] = list(os.getloadavg())
    bs.atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    print_report(report, args.k)
    print(f"\nwrote {args.out}")
    return report


def speedups(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Best ONNX Runtime variant (fp32, and int8) over each PyTorch variant, on medians."""
    def best(names: Sequence[str]) -> str:
        return min(names, key=lambda n: rows[n]["median_ms"])

    fp32, int8 = best(em.FP32_ORT), best(em.INT8_ORT)
    out: dict[str, Any] = {"best_ort_fp32": fp32, "best_ort_int8": int8}
    for t in em.TORCH:
        out[f"{t} / ort as served"] = rows[t]["median_ms"] / rows["ort as served"]["median_ms"]
        out[f"{t} / best ort fp32"] = rows[t]["median_ms"] / rows[fp32]["median_ms"]
        out[f"{t} / best ort int8"] = rows[t]["median_ms"] / rows[int8]["median_ms"]
    return out


def print_report(r: dict[str, Any], k: int) -> None:
    print(f"\nP3 encoder — {r['machine']['cpu']}, {r['machine']['cpu_count']} CPUs, load at start {r['machine']['load_average_at_start']}")
    for threads, per in r["timing"].items():
        names = list(next(iter(per.values()))["variants"])
        print(f"\n{threads} thread(s): median ms per batch")
        print(f"{'variant':<26}" + "".join(f"{w:>16}" for w in per))
        for n in names:
            print(f"{n:<26}" + "".join(f"{per[w]['variants'][n]['median_ms']:>16.1f}" for w in per))
        for ratio in ("torch eager / ort as served", "torch eager / best ort fp32", "torch sdpa / best ort fp32", "torch eager / best ort int8"):
            print(f"{ratio:<26}" + "".join(f"{per[w][ratio]:>15.2f}x" for w in per))
    print("\nagreement with torch eager (the document batch, real tokens): min / mean cosine")
    for n, a in r["agreement"].items():
        print(f"  {n:<32} {a['min_cosine']:.5f} / {a['mean_cosine']:.5f}")
    if "recall" in r:
        rc = r["recall"]
        print(f"\nrecall@{k} against fp32 (exhaustive MaxSim, {rc['documents']} documents, {rc['queries']} queries):")
        for n, v in rc["variants"].items():
            rec = v.get(f"recall_at_{k}")
            print(f"  {n:<12} {v['documents_per_s']:.1f} docs/s, token cosine mean {v['doc_token_cosine_to_fp32']['mean']:.4f}"
                  + (f", recall@{k} {rec:.3f} (fp32 queries: {v[f'recall_at_{k}_fp32_queries']:.3f})" if rec is not None else ""))


if __name__ == "__main__":
    main()
