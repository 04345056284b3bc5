"""Candidate generation (PLAID stages 1-2): each query token probes its nprobe nearest
centroids through hnswlib; the union of their inverted lists, when larger than n_candidates,
is ranked by centroid interaction (MaxSim with each document token replaced by its centroid,
from the stored codes) and cut to the n_candidates best.

Centroid interaction reads each document's distinct codes, not its token codes: a maximum over
a multiset equals the one over its set, and documents repeat centroids (about half the tokens of
MiniLM docstrings share a centroid with an earlier token of the same document), so the ranking
is the same for about half the work."""
from __future__ import annotations

import numpy as np
import torch

from colgrid_server.index import LoadedVersion
from colgrid_server.search._fused import available as fused_available
from colgrid_server.search._fused_centroids import MAX_QUERY_TOKENS, FusedCentroidScores, fused_centroids_self_check
from colgrid_server.search._maxsim import DEFAULT_BLOCK_TOKENS, centroid_maxsim_scores


# Postings this many times fewer than the documents are deduplicated by sorting them; more, by
# a mask over the documents (linear in both).
UNIQUE_BY_SORT_BELOW = 16


class CandidateGenerator:
    """Per-version state for candidate generation: centroids in the compute dtype."""

    def __init__(self, version: LoadedVersion, *, block_tokens: int = DEFAULT_BLOCK_TOKENS, fused: bool | None = None) -> None:
        """fused (default: on a GPU with Triton): centroid interaction by one fused kernel over
        token codes held on the device (`FusedCentroidScores`); on CPU it runs in Triton's
        interpreter (tests only)."""
        self.version = version
        self.block_tokens = block_tokens
        # Ranking candidates tolerates rounding: bf16 on CPU is several times faster than fp32.
        # The fused kernel reads a float32 table.
        use_fused = fused if fused is not None else version.device.type == "cuda" and fused_available(version.device)
        dtype = torch.bfloat16 if version.device.type == "cpu" and not use_fused else torch.float32
        self._centroids = torch.from_numpy(version.centroids).to(version.device, dtype)
        self.codes, self.code_offsets = distinct_codes_per_document(version.token_codes, version.doc_offsets)
        self.fused: FusedCentroidScores | None = None
        if use_fused:
            scorer = FusedCentroidScores(self.codes, self.code_offsets, version.device)
            if fused or fused_centroids_self_check(scorer, self._centroids, self.code_offsets):
                self.fused = scorer

    def __call__(self, query: np.ndarray, nprobe: int, n_candidates: int,
                 allowed: np.ndarray | None = None) -> np.ndarray:
        """Ascending indices of at most n_candidates documents to score exactly; with allowed
        (bool per document), only documents it permits."""
        docs = self.probe(query, nprobe)
        if allowed is not None:
            docs = docs[allowed[docs]]
        if docs.shape[0] <= n_candidates:
            return docs
        scores = self.centroid_scores(query, docs).cpu().numpy()
        keep = np.argpartition(-scores, n_candidates - 1)[:n_candidates]
        return np.sort(docs[keep])

    def probe(self, query: np.ndarray, nprobe: int) -> np.ndarray:
        """Union of the inverted lists of each query token's nprobe nearest centroids."""
        v = self.version
        labels, _ = v.graph.knn_query(query, k=min(nprobe, v.centroid_count), num_threads=1)
        lists = np.unique(labels)
        starts, ends = v.ivf_offsets[lists], v.ivf_offsets[lists + 1]
        lengths = ends - starts
        first = np.zeros(lists.shape[0], dtype=np.int64)
        np.cumsum(lengths[:-1], out=first[1:])
        postings = np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))
        docs = v.ivf_docs[postings]
        if docs.shape[0] * UNIQUE_BY_SORT_BELOW < v.documents:
            return np.unique(docs).astype(np.int64)
        # A mask over the documents, not np.unique's sort: 0.09 vs 3.7 ms for 43k postings of
        # 50k documents, which was most of a default search's candidate stage.
        mask = np.zeros(v.documents, dtype=bool)
        mask[docs] = True
        return np.flatnonzero(mask)

    def centroid_scores(self, query: np.ndarray, docs: np.ndarray) -> torch.Tensor:
        v = self.version
        q = torch.from_numpy(query).to(v.device, self._centroids.dtype)
        table = torch.mm(self._centroids, q.T).to(torch.float32)  # (C, Q)
        if self.fused is not None and table.shape[1] <= MAX_QUERY_TOKENS:
            return self.fused.scores(table, docs)
        return centroid_maxsim_scores(table, self.codes, self.code_offsets, docs, block_tokens=self.block_tokens)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.code_offsets.nbytes)


def distinct_codes_per_document(token_codes: np.ndarray, doc_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, offsets): document i's distinct centroid codes, ascending, are
    codes[offsets[i]:offsets[i + 1]] (codes keep token_codes' dtype)."""
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    documents = offsets.shape[0] - 1
    if token_codes.shape[0] == 0:
        return token_codes[:0].copy(), np.zeros(documents + 1, dtype=np.int64)
    span = int(token_codes.max()) + 1
    owner = np.repeat(np.arange(documents, dtype=np.int64), np.diff(offsets))
    keys = np.unique(owner * span + token_codes.astype(np.int64))  # sorted by document, then code
    codes = (keys % span).astype(token_codes.dtype)
    distinct = np.zeros(documents + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // span, minlength=documents), out=distinct[1:])
    return codes, distinct
