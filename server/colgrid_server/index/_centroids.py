"""Centroids for candidate generation: spherical k-means (torch) over a sample of tokens, the
nearest-centroid code of every token, and an hnswlib graph over the centroids."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import hnswlib
import numpy as np
import torch

# Fewer tokens per centroid than this and the inverted lists say little more than the tokens.
MIN_TOKENS_PER_CENTROID = 8
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200


def centroid_count(n_tokens: int) -> int:
    """PLAID's C = 2^floor(log2(16 * sqrt(N_tok))), at most N_tok / 8 (rounded down to a power of
    two) so that tiny corpora do not get one centroid per token."""
    if n_tokens <= 0:
        raise ValueError("centroid_count needs at least one token")
    plaid = 2 ** int(math.floor(math.log2(16 * math.sqrt(n_tokens))))
    cap = 2 ** int(math.floor(math.log2(max(1, n_tokens // MIN_TOKENS_PER_CENTROID))))
    return max(1, min(plaid, cap))


def compute_dtype(device: torch.device) -> torch.dtype:
    # Assignment only needs the nearest centroid, not an exact score: bf16 on CPU runs several
    # times faster than fp32 (shared/notes/cpu-matmul.md); on GPUs fp32 is fast enough.
    return torch.bfloat16 if device.type == "cpu" else torch.float32


def nearest(vectors: torch.Tensor, centroids_t: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Index of the highest-inner-product centroid per row. centroids_t: (dim, C) in the compute
    dtype; vectors any float dtype on the same device."""
    out = torch.empty(vectors.shape[0], dtype=torch.int64, device=vectors.device)
    for start in range(0, vectors.shape[0], block):
        # Through float32: CPU fp16 -> bf16 conversion is several times slower than fp16 -> fp32 -> bf16.
        chunk = vectors[start : start + block].to(torch.float32).to(centroids_t.dtype)
        # max(dim).indices, not argmax: on CPU the latter is several times slower for bf16.
        out[start : start + block] = torch.mm(chunk, centroids_t).max(dim=1).indices
    return out


def spherical_kmeans(sample: torch.Tensor, n_centroids: int, *, iterations: int, seed: int) -> torch.Tensor:
    """Unit-norm centroids (C, dim) float32 from sample (S, dim) float32, S >= n_centroids.
    Initialised from distinct sample rows; an emptied cluster keeps its previous centroid."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.randperm(sample.shape[0], generator=generator)[:n_centroids].to(sample.device)
    centroids = _normalise(sample[pick].clone())
    dtype = compute_dtype(sample.device)
    for _ in range(iterations):
        codes = nearest(sample, centroids.T.to(dtype).contiguous())
        sums = torch.zeros_like(centroids).index_add_(0, codes, sample)
        counts = torch.bincount(codes, minlength=n_centroids)
        filled = counts > 0
        centroids[filled] = _normalise(sums[filled])
    return centroids


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def build_graph(centroids: np.ndarray, *, seed: int) -> bytes:
    """hnswlib inner-product graph over the centroids, serialised."""
    index = hnswlib.Index(space="ip", dim=centroids.shape[1])
    index.init_index(max_elements=centroids.shape[0], ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=seed)
    index.add_items(centroids, np.arange(centroids.shape[0]), num_threads=max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="colgrid-hnsw-") as tmp:
        path = Path(tmp) / "graph.bin"
        index.save_index(str(path))
        return path.read_bytes()


def load_graph(data: bytes, *, dim: int, count: int, ef: int) -> hnswlib.Index:
    """The graph back from its bytes (hnswlib only loads from a file path)."""
    index = hnswlib.Index(space="ip", dim=dim)
    with tempfile.TemporaryDirectory(prefix="colgrid-hnsw-") as tmp:
        path = Path(tmp) / "graph.bin"
        path.write_bytes(data)
        index.load_index(str(path), max_elements=count)
    index.set_ef(ef)
    return index
