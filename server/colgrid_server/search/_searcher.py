"""Searcher: candidates -> exact MaxSim -> top-k -> explanations, over one loaded version."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from colgrid_server.batching import Batcher
from colgrid_server.errors import InvalidArgument
from colgrid_server.index import DenseTokens, LoadedVersion, TokenStore
from colgrid_server.search._batched import ExactRequest, batched_exact_top_k, segment_maxima
from colgrid_server.search._candidates import CandidateGenerator
from colgrid_server.search._filters import DocumentFilter, FilterIndex
from colgrid_server.search._maxsim import (
    DEFAULT_BLOCK_TOKENS,
    bf16_error_bound,
    int8_screen_scores,
    maxsim_explain,
    maxsim_scores,
    screened_exact_scores,
)
from colgrid_server.search._fused import FusedMaxima, fused_self_check
from colgrid_server.search._fused import available as fused_available
from colgrid_server.search._padded import PaddedDocuments
from colgrid_server.search._params import SearchParams
from colgrid_server.search._results import Hit, PatchRef, SearchResult, SearchStats, TokenMatch

_log = logging.getLogger(__name__)

# Below this many candidate tokens one exact float32 pass is as cheap as a bf16 pass plus the
# exact re-score it needs.
FAST_PASS_MIN_TOKENS = 2 * DEFAULT_BLOCK_TOKENS
# torch intra-op threads while a search runs. One query's matmuls are small: on a busy 2-core
# host, 2 threads made a search ~19x slower (206 vs 11 ms p50) by waiting on each other at every
# op. Concurrency comes from concurrent requests instead.
DEFAULT_SEARCH_THREADS = 1
# On a GPU a block is one kernel launch sequence and its host-side layout: big blocks amortise
# both (2^18 x 128 fp32 similarities for 32 query tokens is 32 MB of device memory).
GPU_BLOCK_TOKENS = 1 << 18
# Filtered search: when at most max(EXACT_FILTERED_DOCS, 2 x n_candidates) documents pass, all
# of them are scored exactly (on one CPU thread ~0.018 ms a document: 1,024 cost about what an
# unfiltered search of 20k documents does, bench/README "Filtered search"); beyond, probing
# widens (x2) at most FILTER_PROBE_WIDENINGS times while fewer than n_candidates turn up.
EXACT_FILTERED_DOCS = 1024
EXACT_FILTERED_PER_CANDIDATE = 2
FILTER_PROBE_WIDENINGS = 3
# Concurrent searches batched into one exact pass (GPU): at most this many, a leader waiting at
# most this long for companions (Triton's max queue delay; far below a search's own latency).
MAX_QUERY_BATCH = 16
GPU_BATCH_DELAY = 0.0005


class Searcher:
    """Searches one LoadedVersion; holds no per-request state, so concurrent searches are safe.

    Scores are exact for the stored vectors: on CPU a bf16 pass ranks the candidates, then every
    document that could still reach the top k under the pass's proven error bound is re-scored
    in float32 (see `bf16_error_bound`); on GPU one float32 pass."""

    def __init__(
        self,
        version: LoadedVersion,
        *,
        block_tokens: int | None = None,
        fast_pass: bool | None = None,
        threads: int = DEFAULT_SEARCH_THREADS,
        batch_queries: bool | None = None,
        batch_delay: float = GPU_BATCH_DELAY,
        padded: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        """batch_queries (default: on a GPU): concurrent searches' exact stages run together,
        one pass over the union of their candidates (`batched_exact_top_k`), a leader waiting
        at most batch_delay seconds for companions. On CPU each search's own screened pass is
        faster, so it is off there by default.
        fused (default: on a GPU with Triton, for float16/bfloat16-resident tokens): exact MaxSim
        is one fused kernel reading each candidate's rows once (`FusedMaxima`), and candidates
        are ranked by a fused centroid-interaction kernel (`FusedCentroidScores`, any codec);
        on CPU both run in Triton's interpreter (tests only).
        padded (default: on a GPU where the fused kernel is not used; True asks for it over the
        fused kernel): exact MaxSim reads a
        padded copy of the tokens bucketed by document length (`PaddedDocuments`) instead of
        gathering rows."""
        self.version = version
        on_gpu = version.device.type == "cuda"
        if block_tokens is None:
            block_tokens = GPU_BLOCK_TOKENS if on_gpu else DEFAULT_BLOCK_TOKENS
        self.block_tokens = block_tokens
        self.threads = threads
        self.fast_pass = version.device.type == "cpu" if fast_pass is None else fast_pass
        self._candidates = CandidateGenerator(version, block_tokens=block_tokens, fused=fused)
        self.filters = FilterIndex(version)
        self.padded: PaddedDocuments | None = None
        self.fused: FusedMaxima | None = None
        store = version.store
        dense_half = isinstance(store, DenseTokens) and store.tokens.dtype in (torch.float16, torch.bfloat16)
        if fused if fused is not None else (on_gpu and dense_half and padded is not True and fused_available(version.device)):
            if not dense_half:
                raise ValueError(f"version {version.name}: the fused kernel reads float16/bfloat16-resident tokens")
            self.fused = FusedMaxima(store.tokens, version.doc_offsets)
            if fused is None and not fused_self_check(self.fused):  # fall back rather than serve wrong scores
                _log.warning("version %s: the fused MaxSim kernel failed its self-check; using the padded layout", version.name)
                self.fused = None
        if self.fused is None and (on_gpu if padded is None else padded) and isinstance(store, DenseTokens):
            try:
                self.padded = PaddedDocuments(store.tokens, version.doc_offsets)
            except torch.OutOfMemoryError:  # a second copy does not fit the device: gather rows instead
                _log.warning("version %s: no device memory for the padded layout; exact MaxSim gathers rows", version.name)
                if on_gpu:
                    torch.cuda.empty_cache()
        if self.fused is not None:
            self._maxima = self.fused.maxima
        elif self.padded is not None:
            self._maxima = self.padded.maxima
        else:
            self._maxima = segment_maxima(store, version.doc_offsets, block_tokens)
        self.batcher: Batcher[ExactRequest, TopK] | None = None
        self._in_flight = 0  # searches between their start and their exact stage's result
        self._in_flight_lock = threading.Lock()
        if on_gpu if batch_queries is None else batch_queries:
            # A leader waits for companions only while other searches are still on their way.
            self.batcher = Batcher(self._top_k_batch, max_batch=MAX_QUERY_BATCH, max_delay=batch_delay,
                                   expect_more=lambda pending: self._in_flight > pending)  # fmt: skip

    def close(self) -> None:
        """Drop what the searcher holds beside the version (the padded copy of its tokens);
        the owner calls it with the version's close, once no search runs."""
        if self.padded is not None:
            self.padded.close()

    def search(self, query_vectors: np.ndarray, query_tokens: Sequence[str], params: SearchParams,
               where: DocumentFilter | None = None) -> SearchResult:
        """Approximate candidates (nprobe, n_candidates), exact MaxSim on them; with `where`,
        among the documents it permits only."""
        query = self._check_query(query_vectors, query_tokens)
        with _intra_op_threads(self.threads):
            started = time.perf_counter()
            allowed = self._allowed(where)
            self._enter()
            try:
                if allowed is None:
                    candidates = self._candidates(query, params.nprobe, params.n_candidates)
                else:
                    candidates = self._filtered_candidates(query, params, allowed)
            except BaseException:
                self._leave()
                raise
            return self._finish(query, query_tokens, params, candidates, started)

    def exhaustive(self, query_vectors: np.ndarray, query_tokens: Sequence[str], params: SearchParams,
                   where: DocumentFilter | None = None) -> SearchResult:
        """Exact MaxSim over every document (that `where` permits): the reference the approximate
        search is measured by."""
        query = self._check_query(query_vectors, query_tokens)
        with _intra_op_threads(self.threads):
            started = time.perf_counter()
            allowed = self._allowed(where)
            docs = np.arange(self.version.documents) if allowed is None else np.flatnonzero(allowed)
            self._enter()
            return self._finish(query, query_tokens, params, docs, started)

    def _allowed(self, where: DocumentFilter | None) -> np.ndarray | None:
        return None if where is None or where.empty else self.filters.mask(where)

    def _filtered_candidates(self, query: np.ndarray, params: SearchParams, allowed: np.ndarray) -> np.ndarray:
        """Few permitted documents: all of them, scored exactly (no candidate can be missed, and
        it costs about what an unfiltered search would). Many: the usual candidates among them,
        probing twice as many centroids while fewer than n_candidates turn up (the filter thins
        the probed lists; it can even exclude the query's neighbourhood), and every permitted
        document if even then fewer than k did."""
        permitted = np.flatnonzero(allowed)
        if permitted.shape[0] <= max(EXACT_FILTERED_DOCS, EXACT_FILTERED_PER_CANDIDATE * params.n_candidates):
            return permitted
        nprobe = params.nprobe
        docs = self._candidates(query, nprobe, params.n_candidates, allowed)
        for _ in range(FILTER_PROBE_WIDENINGS):
            if docs.shape[0] >= params.n_candidates or nprobe >= self.version.centroid_count:
                break
            nprobe *= 2
            docs = self._candidates(query, nprobe, params.n_candidates, allowed)
        return docs if docs.shape[0] >= params.k else permitted

    def _finish(
        self, query: np.ndarray, query_tokens: Sequence[str], params: SearchParams, candidates: np.ndarray, started: float
    ) -> SearchResult:
        scored_at = time.perf_counter()
        query_t = torch.from_numpy(query)
        top, scores = self._top_k(query_t, candidates, params.k)
        explanations = self._explain(query_t, query_tokens, top, scores) if params.explain else [()] * len(top)
        hits = tuple(
            Hit(
                doc_id=self.version.doc_ids[doc],
                score=float(score),
                rank=rank,
                metadata=self.version.metadata(doc),
                explanation=explanation,
                kind="image" if self.version.is_image(doc) else "text",
            )
            for rank, (doc, score, explanation) in enumerate(zip(top.tolist(), scores.tolist(), explanations), start=1)
        )
        finished = time.perf_counter()
        stats = SearchStats(
            candidates_ms=(scored_at - started) * 1e3,
            maxsim_ms=(finished - scored_at) * 1e3,
            candidates=int(candidates.shape[0]),
            query_tokens=int(query.shape[0]),
        )
        return SearchResult(hits=hits, stats=stats)

    def _top_k(self, query: torch.Tensor, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        request = ExactRequest(query=query, docs=docs, k=k)
        if self.batcher is None:
            top = self._top_k_batch([request])[0]
        else:
            try:
                top = self.batcher.submit(request)
            finally:
                self._leave()  # entered in search / exhaustive
        return top.docs, top.scores

    def _enter(self) -> None:
        if self.batcher is not None:
            with self._in_flight_lock:
                self._in_flight += 1

    def _leave(self) -> None:
        if self.batcher is not None:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _top_k_batch(self, requests: list[ExactRequest]) -> list[TopK]:
        v = self.version
        if len(requests) == 1 and self.padded is None and self.fused is None:  # alone: the search's own path (with its fast pass, if any)
            r = requests[0]
            return [exact_top_k(r.query, v.store, v.doc_offsets, r.docs, r.k, fast_pass=self.fast_pass, block_tokens=self.block_tokens)]
        results = batched_exact_top_k(requests, self._maxima)
        return [TopK(docs=res.docs, scores=res.scores, scored=np.asarray(req.docs)) for req, res in zip(requests, results)]

    def _explain(
        self, query: torch.Tensor, query_tokens: Sequence[str], docs: np.ndarray, scores: np.ndarray
    ) -> list[tuple[TokenMatch, ...]]:
        v = self.version
        explanation = maxsim_explain(query, v.store, v.doc_offsets, docs, block_tokens=self.block_tokens)
        token_index = explanation.token_index.cpu().numpy()
        similarity = explanation.similarity.cpu().numpy()
        out = []
        for row, (doc, score) in enumerate(zip(docs.tolist(), scores.tolist())):
            text, base = v.texts[doc], int(v.doc_offsets[doc])
            matches = []
            for q, token in enumerate(query_tokens):
                index = int(token_index[row, q])
                start, end = (int(x) for x in v.spans[base + index])
                sim = float(similarity[row, q])
                patches = patch_refs(v, base + index)
                matches.append(
                    TokenMatch(
                        query_index=q,
                        query_token=token,
                        doc_token_index=index,
                        doc_token=text[start:end] if start >= 0 else "",
                        start=start,
                        end=end,
                        similarity=sim,
                        share=sim / score if score else 0.0,
                        patch=patches[0] if patches else None,
                        pooled=patches[1:],
                    )
                )
            out.append(tuple(matches))
        return out

    def _check_query(self, query_vectors: np.ndarray, query_tokens: Sequence[str]) -> np.ndarray:
        self.version.require_open()
        query = np.asarray(query_vectors)
        dim = self.version.encoder.dim
        if query.ndim != 2 or query.shape[0] == 0 or query.shape[1] != dim:
            raise InvalidArgument(
                f"query vectors have shape {query.shape}, expected (n >= 1, {dim}) for index version {self.version.name}",
                field="query_vectors",
            )
        if not np.issubdtype(query.dtype, np.floating) or not np.isfinite(query).all():
            raise InvalidArgument("query vectors must be finite floating-point numbers", field="query_vectors")
        if len(query_tokens) != query.shape[0]:
            raise InvalidArgument(
                f"{len(query_tokens)} query tokens for {query.shape[0]} query vectors", field="query_tokens"
            )
        return np.ascontiguousarray(query, dtype=np.float32)


@dataclass(frozen=True)
class TopK:
    """The k best documents by exact score, best first, and how many were scored exactly."""

    docs: np.ndarray  # int64 document indices
    scores: np.ndarray  # float32 exact scores
    scored: np.ndarray  # the documents scored exactly (all of them without a fast pass)

    @property
    def rescored(self) -> int:
        return int(self.scored.shape[0])


def exact_top_k(
    query: torch.Tensor,
    store: TokenStore,
    doc_offsets: np.ndarray,
    docs: np.ndarray,
    k: int,
    *,
    fast_pass: bool,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> TopK:
    """The k best of docs by exact (float32) MaxSim, ties to the lower document index. With
    fast_pass, an approximate pass first drops every document that provably cannot reach the
    top k: int8 over the store's resident screen if it has one (and then only the tokens that
    can hold a maximum are scored in float32), else bf16 when there are enough tokens for it
    to pay off; the documents kept are scored exactly."""
    if fast_pass and docs.shape[0] > k and store.screen is not None:
        screened = int8_screen_scores(
            query, store.screen, doc_offsets, docs, max_token_norm=store.max_norm, block_tokens=block_tokens
        )
        # Every document's float32 score lies in [scores - error, scores + error]: the k-th
        # best float32 score is at least the k-th best lower end...
        upper = screened.scores + screened.error
        window = np.flatnonzero(upper >= np.partition(screened.scores - screened.error, -k)[-k])
        # ... and at least the k-th best of any k exact scores: those of the k best approximate
        # ones first, whose floor is near the final one (about half the window stays above it).
        first = window[np.argsort(-screened.scores[window], kind="stable")[:k]]
        first_exact = screened_exact_scores(query, store, doc_offsets, docs, screened, first, block_tokens=block_tokens)
        rest = np.setdiff1d(window[upper[window] >= float(first_exact.min())], first, assume_unique=True)
        rest_exact = screened_exact_scores(query, store, doc_offsets, docs, screened, rest, block_tokens=block_tokens)
        kept = docs[np.concatenate([first, rest])]
        exact = torch.cat([first_exact, rest_exact]).numpy()
    else:
        kept = _bf16_screen(query, store, doc_offsets, docs, k, block_tokens) if fast_pass and docs.shape[0] > k else docs
        exact = maxsim_scores(query, store, doc_offsets, kept, block_tokens=block_tokens).cpu().numpy()
    order = np.lexsort((kept, -exact))[:k]
    return TopK(docs=kept[order], scores=exact[order], scored=kept)


def _bf16_screen(
    query: torch.Tensor, store: TokenStore, doc_offsets: np.ndarray, docs: np.ndarray, k: int, block_tokens: int
) -> np.ndarray:
    n_tokens = int((doc_offsets[docs + 1] - doc_offsets[docs]).sum())
    if n_tokens < FAST_PASS_MIN_TOKENS:
        return docs
    approx = maxsim_scores(query, store, doc_offsets, docs, block_tokens=block_tokens, compute_dtype=torch.bfloat16)
    approx_np = approx.cpu().numpy()
    kth = np.partition(approx_np, -k)[-k]
    # Any document in the exact top k scores within 2 * bound of the k-th approximate score.
    return docs[approx_np >= kth - 2.0 * bf16_error_bound(query, store.max_norm)]


def patch_refs(version: LoadedVersion, token: int) -> tuple[PatchRef, ...]:
    """The patches global token `token` stands for (empty for a text token)."""
    cells, boxes = version.token_patches(token)
    return tuple(PatchRef(row=int(c[0]), col=int(c[1]), box=(int(b[0]), int(b[1]), int(b[2]), int(b[3])))
                 for c, b in zip(cells, boxes))


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count is per calling thread (an OpenMP setting): set it for this
    search only, and give the caller's thread its own setting back."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)
