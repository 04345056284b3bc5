"""Index-time hierarchical token pooling of an image's patch vectors (ColPali authors' recipe).

Neighbouring patches of a page are often near duplicates (white margins, flat backgrounds):
Ward clustering on cosine distance merges each page's n patch vectors into ceil(n / factor)
means. Every pooled vector remembers the patches it stands for, so explanations still point
at patches on the page.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from colgrid_server.errors import InvalidArgument

MAX_POOL_FACTOR = 16


@dataclass(frozen=True)
class PooledPatches:
    """vectors: float32 (m, dim), unit rows when the input rows were. members[i]: indices of
    the input patches pooled into vector i, the one nearest to the pooled vector first."""

    vectors: np.ndarray
    members: tuple[np.ndarray, ...]


def check_pool_factor(pool_factor: int) -> int:
    if not isinstance(pool_factor, int) or not 1 <= pool_factor <= MAX_POOL_FACTOR:
        raise InvalidArgument(f"pool_factor must be an integer in 1..{MAX_POOL_FACTOR} (1: no pooling), "
                              f"got {pool_factor!r}", field="pool_factor")
    return pool_factor


def pool_patches(vectors: np.ndarray, pool_factor: int) -> PooledPatches:
    """Pool (n, dim) patch vectors into ceil(n / pool_factor) vectors (factor 1: unchanged)."""
    check_pool_factor(pool_factor)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = vectors.shape[0]
    target = math.ceil(n / pool_factor)
    if pool_factor == 1 or n <= 1 or target >= n:
        return PooledPatches(vectors=vectors, members=tuple(np.array([i]) for i in range(n)))
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    unit = vectors / norms
    distance = np.clip(1.0 - unit @ unit.T, 0.0, 2.0).astype(np.float64)
    np.fill_diagonal(distance, 0.0)
    distance = (distance + distance.T) / 2  # exact symmetry for squareform
    labels = fcluster(linkage(squareform(distance, checks=False), method="ward"), t=target, criterion="maxclust")
    # Clusters in order of their first patch: pooled rows keep the page's reading order.
    clusters = sorted((np.flatnonzero(labels == label) for label in np.unique(labels)), key=lambda m: int(m[0]))
    unit_input = bool(np.all(np.abs(norms - 1.0) < 1e-2))
    pooled, members = [], []
    for member in clusters:
        mean = vectors[member].mean(axis=0)
        if unit_input:
            mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        order = np.argsort(-(unit[member] @ mean), kind="stable")
        pooled.append(mean)
        members.append(member[order])
    return PooledPatches(vectors=np.stack(pooled).astype(np.float32), members=tuple(members))
