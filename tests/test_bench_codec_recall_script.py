"""bench/bench_codec_recall.py's measuring parts at a tiny scale: the reranked exhaustive ceiling,
the duplicate-aware loss and the near-tie counts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.bench_codec_recall import figures, near_ties, reranked_top
from colgrid_server.index import build_version_from_arrays, open_version
from colgrid_server.search import SearchParams, Searcher

TOP10 = [[f"d{i}" for i in range(10)]]


def test_rerank_of_a_shuffled_top_100_gives_the_exhaustive_top_10(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(3, 9, size=120))]).astype(np.int64)
    tokens = rng.normal(size=(int(offsets[-1]), 16)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    build_version_from_arrays(tmp_path / "v", tokens=tokens, doc_offsets=offsets, doc_ids=[f"d{i}" for i in range(120)],
                              normalized=True, build_params={"n_centroids": 8})  # fmt: skip
    version = open_version(tmp_path / "v")
    query = rng.normal(size=(4, 16)).astype(np.float32)
    top = [h.doc_id for h in Searcher(version).exhaustive(query, [""] * 4, SearchParams(k=100)).hits]
    shuffled = list(rng.permutation(top))
    assert reranked_top(version, {d: i for i, d in enumerate(version.doc_ids)}, query, shuffled) == top[:10]
    version.close()


def test_duplicate_aware_loss_forgives_swapping_identical_documents() -> None:
    swapped = [[*TOP10[0][:9], "d10"]]  # d9 and d10 hold the same token vectors
    keys = {f"d{i}": f"k{i}" for i in range(11)} | {"d10": "k9"}
    found = {"fp16": {"default": TOP10, "exhaustive": TOP10}, "entropy4": {"default": swapped, "exhaustive": TOP10}}
    out = figures(found, TOP10, keys)["entropy4"]
    assert out["recall_loss_vs_fp16"]["loss"] == pytest.approx(0.1)
    assert out["recall_loss_vs_fp16_duplicate_aware"]["loss"] == 0.0
    assert out["exhaustive_recall_loss"]["loss"] == 0.0


def test_near_ties_counts_small_gaps_and_exact_ties_at_rank_10() -> None:
    base = [float(20 - i) for i in range(9)]
    scores = [base + [5.0, 5.0], base + [5.0, 4.998], base + [5.0, 4.0], base + [5.0, 4.5]]
    ties = near_ties(scores, 0.005)
    assert ties["share_below"] == 0.5
    assert ties["exact_ties"] == 1
