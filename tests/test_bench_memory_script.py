"""bench/bench_memory.py end to end at a tiny scale: vector files made by cycling a source with
noise, a CLI build and a served version whose memory and searches are reported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from colgrid_server.index import open_version

DIM = 32


def _write_source(directory: Path, n_docs: int = 40, n_queries: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.normal(size=(int(offsets[-1]), DIM)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    queries = rng.normal(size=(n_queries * 5, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    directory.mkdir(parents=True)
    np.save(directory / "tokens.npy", tokens.astype(np.float16))
    np.save(directory / "doc_offsets.npy", offsets)
    (directory / "doc_ids.txt").write_text("".join(f"doc-{i}\n" for i in range(n_docs)))
    np.save(directory / "queries.npy", queries)
    np.save(directory / "query_offsets.npy", np.arange(0, n_queries * 5 + 1, 5, dtype=np.int64))
    return tokens, offsets


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from bench.bench_memory import main

    root = tmp_path_factory.mktemp("bench-memory")
    _write_source(root / "source")
    report = main(["--docs", "100", "--source", str(root / "source"), "--work-dir", str(root / "work"),
                   "--out", str(root / "memory.json"), "--passes", "1", "--warmup", "1", "--recall-queries", "2",
                   "--no-screen", "--interval", "0.1"])
    return report, root


def test_documents_cycle_the_source_with_real_lengths_and_noisy_unit_copies(run: tuple[dict, Path]) -> None:
    report, root = run
    (vectors,) = (root / "work" / "vectors").iterdir()
    tokens, offsets = np.load(vectors / "tokens.npy"), np.load(vectors / "doc_offsets.npy")
    src, src_offsets = np.load(root / "source" / "tokens.npy"), np.load(root / "source" / "doc_offsets.npy")
    ids = (vectors / "doc_ids.txt").read_text().splitlines()
    assert len(ids) == len(set(ids)) == 100 and ids[0] == "doc-0" and ids[40] == "doc-0~1" and ids[99] == "doc-19~2"
    assert np.array_equal(np.diff(offsets), np.diff(src_offsets)[np.arange(100) % 40])
    assert np.array_equal(tokens[: src.shape[0]], src)  # copy 0 as it is
    copy1 = tokens[src.shape[0] : 2 * src.shape[0]].astype(np.float32)
    cosines = np.einsum("ij,ij->i", copy1, src.astype(np.float32))
    assert 0.95 < cosines.min() and cosines.max() < 0.9999  # perturbed, not replaced
    assert np.allclose(np.linalg.norm(copy1, axis=1), 1.0, atol=2e-3)
    assert report["vectors"]["tokens"] == int(offsets[-1])


def test_the_build_reports_its_own_peak_and_the_version_it_published(run: tuple[dict, Path]) -> None:
    report, _ = run
    build = report["build"]
    assert build["counts"]["documents"] == 100 and build["counts"]["tokens"] == report["vectors"]["tokens"]
    assert "READY: 100 documents" in build["cli_output"]
    assert 0 < build["sampled_peak_rss_bytes"] <= build["peak_rss_bytes"]
    assert build["disk"]["bytes"] >= build["counts"]["tokens"] * DIM * 2


def test_serving_reports_memory_latency_and_recall_of_hits(run: tuple[dict, Path]) -> None:
    report, root = run
    served = report["serve"]["plain"]
    assert list(report["serve"]) == ["plain"]
    assert served["searches"]["count"] == 4 and served["searches"]["queries_with_k_hits"] == 4
    assert served["after_load"]["VmRSS"] <= served["peak_rss_bytes"] and served["sampled"]["search"]["anon"] > 0
    assert 0.0 <= served["recall"]["recall_at_10"] <= 1.0 and served["recall"]["queries"] == 2
    assert json.loads((root / "memory.json").read_text())["under_target"] is True


def test_the_resident_estimate_is_what_the_loaded_version_reports(run: tuple[dict, Path]) -> None:
    report, root = run
    version = open_version(root / "work" / "data" / "indexes" / "memory" / report["build"]["version"], device="cpu")
    try:
        assert report["serve"]["plain"]["resident_arrays"]["total"] == version.nbytes
    finally:
        version.close()
