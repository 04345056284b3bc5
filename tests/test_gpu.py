"""The GPU path (torch CUDA): exact MaxSim and whole searches on the device equal the float64
reference and the CPU path. Selected at run time: these run where a CUDA device is present
(the lent GPU machine, `bench/gpu_check.sh`), and are skipped on CPU-only machines and in CI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from colgrid_server.index import build_version_from_arrays, open_version
from colgrid_server.search import SearchParams, Searcher, maxsim_explain, maxsim_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh there)")

DIM = 64


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _corpus(seed: int, n_docs: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (topics), documents of 1..120 tokens."""
    rng = np.random.default_rng(seed)
    topics = _unit(rng.normal(size=(40, DIM)))
    lengths = rng.integers(1, 121, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    topic_of = np.repeat(rng.integers(0, 40, size=n_docs), lengths)
    tokens = _unit(topics[topic_of] + 0.35 * rng.normal(size=(offsets[-1], DIM)))
    return tokens, offsets


def _reference(query: np.ndarray, tokens16: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    t = tokens16.astype(np.float64)
    q = query.astype(np.float64)
    return np.array([(t[offsets[d]:offsets[d + 1]] @ q.T).max(axis=0).sum() for d in range(offsets.shape[0] - 1)])


def test_cuda_maxsim_equals_the_float64_reference() -> None:
    tokens, offsets = _corpus(0)
    tokens16 = tokens.astype(np.float16)
    query = _unit(np.random.default_rng(1).normal(size=(32, DIM)))
    docs = np.arange(offsets.shape[0] - 1)
    on_gpu = torch.from_numpy(tokens16).cuda()
    scores = maxsim_scores(torch.from_numpy(query), on_gpu, offsets, docs, block_tokens=1 << 12).cpu().numpy()
    assert np.abs(scores - _reference(query, tokens16, offsets)).max() < 1e-4
    top = lambda s: list(np.lexsort((docs, -s))[:10])  # noqa: E731
    assert top(scores) == top(_reference(query, tokens16, offsets))


def test_cuda_explanations_equal_the_cpu_ones() -> None:
    tokens, offsets = _corpus(2, n_docs=200)
    tokens16 = torch.from_numpy(tokens.astype(np.float16))
    query = torch.from_numpy(_unit(np.random.default_rng(3).normal(size=(20, DIM))))
    docs = np.arange(0, 200, 3)
    cpu = maxsim_explain(query, tokens16, offsets, docs, block_tokens=256)
    gpu = maxsim_explain(query, tokens16.cuda(), offsets, docs, block_tokens=1 << 12)
    assert torch.equal(cpu.token_index, gpu.token_index.cpu())
    assert torch.allclose(cpu.similarity, gpu.similarity.cpu(), atol=1e-5)


@pytest.mark.parametrize("codec", ["fp16", "int8", "residual4", "entropy4"])
def test_a_version_loaded_on_cuda_answers_like_the_cpu_one(tmp_path: Path, codec: str) -> None:
    tokens, offsets = _corpus(4, n_docs=1500)
    build_version_from_arrays(tmp_path / "v1", tokens=tokens, doc_offsets=offsets,
                              doc_ids=[f"d{i}" for i in range(offsets.shape[0] - 1)], normalized=True,
                              build_params={"n_centroids": 256, "codec": codec})
    cpu = open_version(tmp_path / "v1", device="cpu")
    gpu = open_version(tmp_path / "v1", device="cuda")
    assert gpu.device.type == "cuda"
    rng = np.random.default_rng(5)
    params = SearchParams(k=10, nprobe=4, n_candidates=256)
    tokens16 = tokens.astype(np.float16)
    overlaps = []
    for _ in range(20):
        doc = int(rng.integers(0, offsets.shape[0] - 1))
        n = int(min(24, offsets[doc + 1] - offsets[doc]))
        query = _unit(tokens[offsets[doc]:offsets[doc] + n] + 0.05 * rng.normal(size=(n, DIM)))
        labels = [f"q{i}" for i in range(query.shape[0])]
        a = Searcher(cpu).search(query, labels, params)
        b = Searcher(gpu).search(query, labels, params)
        # Candidate pruning ranks centroids in bf16 on CPU and float32 on GPU, so the approximate
        # candidate sets may differ a little; every score returned is exact either way.
        overlaps.append(len({h.doc_id for h in a.hits} & {h.doc_id for h in b.hits}) / len(a.hits))
        if codec == "fp16":
            reference = _reference(query, tokens16, offsets)
            for hit in b.hits:
                assert abs(hit.score - reference[int(hit.doc_id[1:])]) < 1e-4
        ex_a = Searcher(cpu).exhaustive(query, labels, params)
        ex_b = Searcher(gpu).exhaustive(query, labels, params)
        assert [h.doc_id for h in ex_a.hits] == [h.doc_id for h in ex_b.hits]
        assert np.allclose([h.score for h in ex_a.hits], [h.score for h in ex_b.hits], atol=1e-4)
    assert np.mean(overlaps) >= 0.9


def test_open_version_picks_cuda_by_default_when_present(tmp_path: Path) -> None:
    tokens, offsets = _corpus(6, n_docs=50)
    build_version_from_arrays(tmp_path / "v1", tokens=tokens, doc_offsets=offsets,
                              doc_ids=[f"d{i}" for i in range(50)], normalized=True, build_params={"n_centroids": 32})
    assert open_version(tmp_path / "v1").device.type == "cuda"


@pytest.mark.parametrize("layout", ["fused", "padded"])
def test_cuda_searches_batched_on_each_layout_answer_like_the_segment_kernel(tmp_path: Path, layout: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tokens, offsets = _corpus(6, n_docs=1200)
    build_version_from_arrays(tmp_path / "v1", tokens=tokens, doc_offsets=offsets,
                              doc_ids=[f"d{i}" for i in range(offsets.shape[0] - 1)], normalized=True,
                              build_params={"n_centroids": 256})  # fmt: skip
    gpu = open_version(tmp_path / "v1", device="cuda")
    default = Searcher(gpu) if layout == "fused" else Searcher(gpu, fused=False)
    plain = Searcher(gpu, fused=False, padded=False, batch_queries=False)
    assert default.batcher is not None
    assert (default.fused is not None) if layout == "fused" else (default.padded is not None and default.fused is None)
    rng = np.random.default_rng(8)
    queries = []
    for _ in range(32):
        doc = int(rng.integers(0, offsets.shape[0] - 1))
        n = int(min(24, offsets[doc + 1] - offsets[doc]))
        queries.append(_unit(tokens[offsets[doc]:offsets[doc] + n] + 0.05 * rng.normal(size=(n, DIM))))
    params = SearchParams(k=10, nprobe=4, n_candidates=256)

    def run(i: int):
        q = queries[i]
        return (default.exhaustive if i % 4 == 0 else default.search)(q, [f"q{j}" for j in range(q.shape[0])], params)

    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(run, range(len(queries))))
    for i, (q, a) in enumerate(zip(queries, got)):
        b = (plain.exhaustive if i % 4 == 0 else plain.search)(q, [f"q{j}" for j in range(q.shape[0])], params)
        assert [h.doc_id for h in a.hits] == [h.doc_id for h in b.hits]
        assert np.allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-4)
