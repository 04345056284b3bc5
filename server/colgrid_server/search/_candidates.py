"""Candidate generation: each query token probes its nprobe nearest centroids (hnswlib); the
union of their inverted lists is pruned, when larger than n_candidates, by an approximate
score computed from the postings alone (no token vectors touched)."""
from __future__ import annotations

import numpy as np
import torch

from colgrid_server.index import LoadedVersion


def candidate_documents(version: LoadedVersion, query: np.ndarray, nprobe: int, n_candidates: int) -> np.ndarray:
    """Ascending indices of at most n_candidates documents to score exactly."""
    nprobe = min(nprobe, version.centroid_count)
    labels, distances = version.graph.knn_query(query, k=nprobe, num_threads=1)
    centroid_sims = (1.0 - distances).astype(np.float32)  # hnswlib "ip" distance is 1 - <q, c>
    lists = labels.reshape(-1).astype(np.int64)
    starts = version.ivf_offsets[lists]
    lengths = version.ivf_offsets[lists + 1] - starts
    owner = np.repeat(np.arange(lists.shape[0]), lengths)  # which (query token, probe) a posting came from
    first = np.zeros(lists.shape[0], dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    docs = version.ivf_docs[starts[owner] + np.arange(owner.shape[0]) - first[owner]]
    unique, inverse = np.unique(docs, return_inverse=True)
    if unique.shape[0] <= n_candidates:
        return unique
    scores = _approximate_scores(inverse, owner, centroid_sims, unique.shape[0])
    keep = np.argpartition(-scores, n_candidates - 1)[:n_candidates]
    return np.sort(unique[keep])


def _approximate_scores(doc_of: np.ndarray, owner: np.ndarray, centroid_sims: np.ndarray, n_docs: int) -> np.ndarray:
    """sum_q max over the document's postings for q of <q, centroid>. A (document, query token)
    pair with no posting gets that token's lowest probed centroid similarity: its best token
    lies in an unprobed centroid, which is no closer (the XTR/WARP imputation)."""
    n_q, nprobe = centroid_sims.shape
    sims = torch.from_numpy(centroid_sims)
    table = sims.min(dim=1).values.repeat(n_docs)  # flat (n_docs * Q), row-major by document
    owner_t = torch.from_numpy(owner)
    slots = torch.from_numpy(doc_of.astype(np.int64)) * n_q + owner_t // nprobe
    table.scatter_reduce_(0, slots, sims.reshape(-1)[owner_t], "amax", include_self=True)
    return table.view(n_docs, n_q).sum(dim=1).numpy()
