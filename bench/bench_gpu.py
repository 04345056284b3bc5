"""GPU path figures (run on a CUDA machine: `bash bench/gpu_check.sh`; also runs on CPU).

1. Exact MaxSim kernel over a candidate set (32 query tokens x 1,000 candidates x 100-1,000
   tokens each) vs one plain matmul of the same shapes, on the same device, per dtype; the
   segment kernel and the padded layout (the GPU default), each as a fraction of the device's
   measured memory bandwidth (candidates' float16 bytes per second / a device copy's).
2. Whole searches (centroid candidates + exact MaxSim) on a synthetic clustered version built
   from arrays: queries/second on the device vs the CPU, defaults and exhaustive.
Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from colgrid_server.index import build_version_from_arrays, open_version
from colgrid_server.search import SearchParams, Searcher, maxsim_scores
from colgrid_server.search._fused import FusedMaxima, LaunchConfig
from colgrid_server.search._fused import available as fused_available
from colgrid_server.search._padded import PaddedDocuments

# Fused-kernel launch configurations timed on the kernel shape (the library default is one).
SWEEP = [LaunchConfig(32, 4, 3), LaunchConfig(64, 4, 2), LaunchConfig(64, 4, 3), LaunchConfig(64, 4, 4),
         LaunchConfig(64, 8, 3), LaunchConfig(128, 4, 3), LaunchConfig(128, 8, 3), LaunchConfig(128, 8, 4)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeat


def kernel(device: torch.device, dim: int, repeat: int, seed: int = 0, candidates: int = 1000) -> dict:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, 1001, size=candidates)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n_tok = int(offsets[-1])
    tokens = torch.from_numpy(rng.standard_normal((n_tok, dim), dtype=np.float32)).to(torch.float16).to(device)
    query = torch.from_numpy(rng.standard_normal((32, dim), dtype=np.float32))
    docs = np.arange(candidates)
    block = 1 << 18 if device.type == "cuda" else 8192
    out = {"candidates": candidates, "tokens": n_tok, "dim": dim, "query_tokens": 32}
    flops = 2.0 * n_tok * dim * 32
    maxsim_fp32 = _timed(lambda: maxsim_scores(query, tokens, offsets, docs, block_tokens=block), device, repeat)
    out["maxsim_fp32_ms"] = maxsim_fp32 * 1e3
    matmuls = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if device.type == "cpu" and name == "fp16":
            continue  # ~200x slower on CPU (shared/notes/cpu-matmul.md): not a meaningful peak
        a = tokens.to(dtype)
        b = query.to(device=device, dtype=dtype).T.contiguous()
        matmuls[name] = _timed(lambda: torch.mm(a, b), device, repeat)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        a, b = tokens.float(), query.to(device).T.contiguous()
        matmuls["tf32"] = _timed(lambda: torch.mm(a, b), device, repeat)
        torch.backends.cuda.matmul.allow_tf32 = False
    layout = PaddedDocuments(tokens, offsets)
    padded = _timed(lambda: layout.maxima(query, docs).sum(dim=1), device, repeat)
    out["maxsim_padded_ms"] = padded * 1e3
    # Memory bandwidth: bytes the kernel must read at least (the candidates' float16 tokens)
    # per second, against a device-to-device copy's (read + write) on the same device.
    source = torch.empty(1 << 28, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    copy_s = _timed(lambda: target.copy_(source), device, repeat)
    bandwidth = 2 * source.element_size() * source.nelement() / copy_s
    candidate_bytes = tokens.element_size() * tokens.nelement()
    read_s = _timed(lambda: source.sum(dtype=torch.float32), device, repeat)
    out["copy_bandwidth_gb_s"] = bandwidth / 1e9
    out["read_bandwidth_gb_s"] = 2 * source.nelement() / read_s / 1e9  # a reduction: reads only
    out["candidate_bytes"] = candidate_bytes
    out["padded_bytes"] = layout.nbytes
    out["segment_fraction_of_bandwidth"] = candidate_bytes / maxsim_fp32 / bandwidth
    out["padded_fraction_of_bandwidth"] = candidate_bytes / padded / bandwidth
    del source, target
    if fused_available(device):
        out["fused"] = _fused_sweep(tokens, offsets, query, docs, device, repeat, candidate_bytes, bandwidth)
    fastest = min(matmuls.values())
    out["matmul_ms"] = {k: v * 1e3 for k, v in matmuls.items()}
    out["matmul_tflops"] = {k: flops / v / 1e12 for k, v in matmuls.items()}
    out["maxsim_vs_fastest_matmul"] = fastest / maxsim_fp32
    out["maxsim_vs_fp32_matmul"] = matmuls["fp32"] / maxsim_fp32
    return out


def _fused_sweep(tokens, offsets, query, docs, device, repeat, candidate_bytes, bandwidth) -> dict:
    """Each launch configuration: the whole maxima() call (input preparation included) and the
    kernel alone (inputs prepared once, `FusedMaxima.launcher`), as fractions of the bandwidth."""
    out: dict = {"configs": []}
    reference = None
    for config in SWEEP:
        row = {"block_tokens": config.block_tokens, "warps": config.warps, "stages": config.stages}
        try:
            layout = FusedMaxima(tokens, offsets, config)
            got = layout.maxima(query, docs)
            reference = got if reference is None else reference
            row["max_abs_diff_vs_first"] = float((got - reference).abs().max())
            call = _timed(lambda: layout.maxima(query, docs), device, repeat)
            launch = layout.launcher(query, docs)
            alone = _timed(launch, device, max(repeat, 100))
            row.update(call_ms=call * 1e3, kernel_ms=alone * 1e3,
                       call_fraction_of_bandwidth=candidate_bytes / call / bandwidth,
                       kernel_fraction_of_bandwidth=candidate_bytes / alone / bandwidth)
        except Exception as error:  # noqa: BLE001 - a config the compiler refuses: report it, go on
            row["error"] = repr(error)[:300]
        out["configs"].append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in out["configs"] if "kernel_ms" in r]
    if timed:
        out["best_kernel"] = min(timed, key=lambda r: r["kernel_ms"])
        out["best_call"] = min(timed, key=lambda r: r["call_ms"])
    # Against the float64 reference, on the default configuration.
    q64 = query.to(torch.float64)
    exact = torch.stack([(tokens[offsets[d]:offsets[d + 1]].to(torch.float64).cpu() @ q64.T).amax(0) for d in docs[:200]])
    got = FusedMaxima(tokens, offsets).maxima(query, docs[:200]).cpu().to(torch.float64)
    out["default_max_error_vs_float64_relative_to_max"] = float((got - exact).abs().max() / exact.abs().max())
    return out


def searches(device: torch.device, dim: int, n_docs: int, n_queries: int, workdir: Path, seed: int = 1,
             gpu_branches: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((512, dim), dtype=np.float32)
    lengths = rng.integers(20, 200, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    topic = np.repeat(rng.integers(0, 512, size=n_docs), lengths)
    tokens = topics[topic] + 0.6 * rng.standard_normal((int(offsets[-1]), dim), dtype=np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    started = time.perf_counter()
    build_version_from_arrays(workdir / "v1", tokens=tokens, doc_offsets=offsets,
                              doc_ids=[f"d{i}" for i in range(n_docs)], normalized=True)
    build_s = time.perf_counter() - started
    queries = []
    for doc in rng.integers(0, n_docs, size=n_queries):
        n = int(min(32, lengths[doc]))
        q = tokens[offsets[doc]:offsets[doc] + n] + 0.1 * rng.standard_normal((n, dim), dtype=np.float32)
        queries.append(q / np.linalg.norm(q, axis=1, keepdims=True))
    out: dict = {"documents": n_docs, "tokens": int(offsets[-1]), "build_s": build_s, "queries": n_queries}
    results = {}
    runs = [("cpu", {})]
    if device.type == "cuda" or gpu_branches:
        # The GPU defaults (fused kernel where Triton is), then the padded layout and the segment kernel.
        runs += [("cuda", {} if device.type == "cuda" else {"fused": True}), ("cuda_padded", {"fused": False, "padded": True}),
                 ("cuda_segment", {"fused": False, "padded": False})]
    for where, options in runs:
        version = open_version(workdir / "v1", device="cpu" if where == "cpu" else device.type)
        searcher = Searcher(version, batch_queries=False, **options)
        out.setdefault("layouts", {})[where] = ("fused" if searcher.fused is not None else
                                               "padded" if searcher.padded is not None else "segment")  # fmt: skip
        for mode in ("defaults", "exhaustive"):
            run = searcher.exhaustive if mode == "exhaustive" else searcher.search
            count = max(5, n_queries // 10) if mode == "exhaustive" and where == "cpu" else n_queries
            run(queries[0], [""] * queries[0].shape[0], SearchParams())
            started = time.perf_counter()
            answers = [run(q, [""] * q.shape[0], SearchParams()) for q in queries[:count]]
            elapsed = time.perf_counter() - started
            results[f"{where}_{mode}"] = {
                "qps": count / elapsed, "ms_per_query": elapsed / count * 1e3,
                "candidates_ms": float(np.mean([a.stats.candidates_ms for a in answers])),
                "exact_and_explain_ms": float(np.mean([a.stats.maxsim_ms for a in answers])),
            }  # fmt: skip
            results[f"{where}_{mode}_top"] = [[h.doc_id for h in a.hits] for a in answers]
        if where.startswith("cuda"):
            # Exact stage alone over every document (no candidate generation): the kernel at scale.
            if searcher.fused is not None:
                q = torch.from_numpy(queries[0])
                launch = searcher.fused.launcher(q, np.arange(n_docs))
                seconds = _timed(launch, device, 20)
                nbytes = version.store.tokens.element_size() * version.store.tokens.nelement()
                out["exhaustive_kernel_ms"] = seconds * 1e3
                out["exhaustive_kernel_gb_s"] = nbytes / seconds / 1e9
        searcher.close()
        if where == "cuda":
            # 16 concurrent clients, batched exact stages (the GPU default) against unbatched.
            for batched in (True, False):
                concurrent = Searcher(version, batch_queries=batched)
                for mode in ("defaults", "exhaustive"):
                    fn = concurrent.exhaustive if mode == "exhaustive" else concurrent.search
                    with ThreadPoolExecutor(max_workers=16) as pool:
                        list(pool.map(lambda q: fn(q, [""] * q.shape[0], SearchParams()), queries[:32]))
                        started = time.perf_counter()
                        answers = list(pool.map(lambda q: fn(q, [""] * q.shape[0], SearchParams()), queries))
                        elapsed = time.perf_counter() - started
                    key = f"cuda_16_clients_{'batched' if batched else 'unbatched'}_{mode}"
                    results[key] = {"qps": n_queries / elapsed}
                    results[key + "_top"] = [[h.doc_id for h in a.hits] for a in answers]
                    if concurrent.batcher is not None:
                        results[key]["mean_batch"] = concurrent.batcher.items / max(1, concurrent.batcher.runs)
                concurrent.close()
        version.close()
    if device.type == "cuda" or gpu_branches:
        for key in [k for k in results if k.endswith("_top") and not k.startswith("cpu_")]:
            mode = "exhaustive" if "exhaustive" in key else "defaults"
            n = len(results[f"cpu_{mode}_top"])
            same = [a == b for a, b in zip(results[f"cpu_{mode}_top"], results[key][:n])]
            out[key.replace("_top", "_equals_cpu_top10")] = float(np.mean(same))
    out.update({k: v for k, v in results.items() if not k.endswith("_top")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--kernel-candidates", type=int, default=1000)
    parser.add_argument("--check-gpu-branches", action="store_true",
                        help="run the GPU-only parts on this device too (a dry run of the script on CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    report["kernel"] = kernel(device, args.dim, args.repeat, candidates=args.kernel_candidates)
    print(json.dumps(report["kernel"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["search"] = searches(device, args.dim, args.documents, args.queries, Path(tmp),
                                    gpu_branches=args.check_gpu_branches)
    print(json.dumps(report["search"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
