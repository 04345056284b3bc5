"""Explain one document for one query: its exact MaxSim score, each query token's best document
token (for a page: its patch cell and pixel box), and for pages a per-patch score grid that
renders as a heatmap over the stored page image (DESIGN.md "Explanations").

The grid holds, for each patch cell, the similarity of the vector standing for that patch (a
pooled vector gives every member patch its own similarity) with:

- one query token (`query_token=i`): exactly colpali-engine's similarity map for token i;
- the whole query (`query_token=None`): the SUM over query tokens of their similarities, i.e.
  <sum_q q, p>, the score a page made of that patch alone would get from the query. Being
  linear, it is the sum of the per-token maps and stays in score units; unlike the per-patch
  max it does not let one token that happens to match everything faintly take over the map,
  and unlike MaxSim shares it is dense (every patch gets a value, not only argmax patches).
  The wire protocol (ExplainRequest.query_token) documents the same choice.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from colgrid_server.errors import CorruptVersion, FailedPrecondition, InvalidArgument, NotFound
from colgrid_server.heatmap import render_heatmap
from colgrid_server.index import LoadedVersion
from colgrid_server.search._maxsim import DEFAULT_BLOCK_TOKENS, maxsim_explain
from colgrid_server.search._results import TokenMatch
from colgrid_server.search._searcher import DEFAULT_SEARCH_THREADS, _intra_op_threads, patch_refs

DEFAULT_ALPHA = 0.5  # heat over page, as colpali-engine's plot_similarity_map
# zlib level for the PNG: encoding dominates rendering. A 1224x1584 page (144 dpi letter) took
# 83 ms / 47 KB at Pillow's default 6 and 40 ms / 71 KB at 3 (bicubic heat + blend: 28 ms).
PNG_COMPRESS_LEVEL = 3


@dataclass(frozen=True)
class DocumentExplanation:
    """How one document scored for one query. `matches` has one entry per query token (as a
    search hit's explanation); `grid`, `patch_scores` and `page_size` are set for image
    documents only. patch_scores[r, c] is the score of patch cell (r, c) (see the module
    docstring); a cell no patch covers (never, for pages colgrid encoded) holds NaN."""

    doc_id: str
    doc_index: int
    kind: str  # "text" or "image"
    score: float  # exact MaxSim, the same value a search scores this document with
    matches: tuple[TokenMatch, ...]
    query_token: int | None = None  # the token patch_scores is for; None: all tokens, summed
    grid: tuple[int, int] | None = None  # (rows, cols) of the patch grid
    patch_scores: np.ndarray | None = field(default=None, compare=False, repr=False)  # float32 (rows, cols)
    page_size: tuple[int, int] | None = None  # (width, height) of the page image, pixels


def find_document(version: LoadedVersion, doc_id: str, *, index: str = "") -> int:
    """The position of `doc_id` in `version`, or NotFound naming the document and the version."""
    version.require_open()
    try:
        return version.doc_ids.index(doc_id)  # a linear scan: one per request, no resident map
    except ValueError:
        where = f"{index}/{version.name}" if index else f"index version {version.name}"
        raise NotFound(f"document {doc_id!r} is not in {where}", resource_type="document",
                       resource_name=doc_id) from None


def explain_document(version: LoadedVersion, query_vectors: np.ndarray, query_tokens: Sequence[str],
                     doc_index: int, *, query_token: int | None = None,
                     block_tokens: int = DEFAULT_BLOCK_TOKENS) -> DocumentExplanation:
    """Score and explain document `doc_index` of `version` for the query. The score and
    matches come from the same kernel (exact float32 MaxSim) a search's explanations do."""
    version.require_open()
    query = _check_query(version, query_vectors, query_tokens)
    if not 0 <= doc_index < version.documents:
        raise InvalidArgument(f"document index {doc_index} is outside 0..{version.documents - 1}", field="doc_index")
    if query_token is not None and not 0 <= query_token < query.shape[0]:
        raise InvalidArgument(f"query_token {query_token} is out of range: the query has {query.shape[0]} tokens "
                              f"(0..{query.shape[0] - 1})", field="query_token")
    with _intra_op_threads(DEFAULT_SEARCH_THREADS):
        query_t = torch.from_numpy(query)
        best = maxsim_explain(query_t, version.store, version.doc_offsets, np.array([doc_index]),
                              block_tokens=block_tokens)
        score = float(best.similarity.sum(dim=1)[0])  # summed as maxsim_scores sums: equal to a search's score
        matches = token_matches(version, doc_index, query_tokens, best.token_index[0].cpu().numpy(),
                                best.similarity[0].cpu().numpy(), score)
        doc_id = version.doc_ids[doc_index]
        if not version.is_image(doc_index):
            return DocumentExplanation(doc_id=doc_id, doc_index=doc_index, kind="text", score=score,
                                       matches=matches, query_token=query_token)
        grid, page_size = _patch_grid(version, doc_index, _vector_scores(version, doc_index, query_t, query_token))
    return DocumentExplanation(doc_id=doc_id, doc_index=doc_index, kind="image", score=score, matches=matches,
                               query_token=query_token, grid=(grid.shape[0], grid.shape[1]), patch_scores=grid,
                               page_size=page_size)


def token_matches(version: LoadedVersion, doc_index: int, query_tokens: Sequence[str], token_index: np.ndarray,
                  similarity: np.ndarray, score: float) -> tuple[TokenMatch, ...]:
    """One TokenMatch per query token, given each one's best token (within the document) and
    its similarity: the document text span, or the patch(es) the matched vector stands for."""
    text, base = version.texts[doc_index], int(version.doc_offsets[doc_index])
    matches = []
    for q, token in enumerate(query_tokens):
        index = int(token_index[q])
        start, end = (int(x) for x in version.spans[base + index])
        sim = float(similarity[q])
        patches = patch_refs(version, base + index)
        matches.append(TokenMatch(query_index=q, query_token=token, doc_token_index=index,
                                  doc_token=text[start:end] if start >= 0 else "", start=start, end=end,
                                  similarity=sim, share=sim / score if score else 0.0,
                                  patch=patches[0] if patches else None, pooled=patches[1:]))
    return tuple(matches)


def render_explanation_png(version: LoadedVersion, doc_index: int, explanation: DocumentExplanation,
                           alpha: float = DEFAULT_ALPHA) -> bytes:
    """A PNG of the stored page image with `explanation`'s patch scores blended over it
    (min-max normalised, bicubic, "mako"; see colgrid_server.heatmap), at the page's size.
    FailedPrecondition for a text document or a version that kept no page image."""
    if explanation.patch_scores is None or explanation.page_size is None:
        raise FailedPrecondition(f"document {explanation.doc_id!r} is a text document: heatmaps exist for image "
                                 f"documents (pages) only")
    path = version.page_image_path(doc_index)
    if path is None:
        raise FailedPrecondition(f"index version {version.name} kept no page image for document "
                                 f"{explanation.doc_id!r}: rebuild it with page images kept to render heatmaps")
    try:
        with Image.open(path) as opened:
            page = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise CorruptVersion(f"index version {version.path}: page image {path.name} of document "
                             f"{explanation.doc_id!r} cannot be read ({exc})", version_path=str(version.path)) from exc
    cells, boxes = _doc_patches(version, doc_index)
    scores = explanation.patch_scores[cells[:, 0], cells[:, 1]]
    image = render_heatmap(page, boxes, scores, alpha=alpha, boxes_size=explanation.page_size)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


# ---------------------------------------------------------------------------------- helpers

def _vector_scores(version: LoadedVersion, doc_index: int, query: torch.Tensor, query_token: int | None) -> np.ndarray:
    """float32 (n_vectors,): each of the document's vectors scored against one query token, or
    against every token summed."""
    store = version.store
    first, last = int(version.doc_offsets[doc_index]), int(version.doc_offsets[doc_index + 1])
    vectors = store.gather(torch.arange(first, last, device=store.device))  # float32, decoded
    q = query.to(store.device)
    sims = vectors @ (q[query_token:query_token + 1] if query_token is not None else q).T  # (n, 1 or Q)
    return sims.sum(dim=1).cpu().numpy().astype(np.float32)


def _doc_patches(version: LoadedVersion, doc_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(cells (p, 2), boxes (p, 4)) of every patch of the document, grouped by vector."""
    assert version.patch_offsets is not None and version.patch_cells is not None and version.patch_boxes is not None
    first, last = int(version.doc_offsets[doc_index]), int(version.doc_offsets[doc_index + 1])
    lo, hi = int(version.patch_offsets[first]), int(version.patch_offsets[last])
    return version.patch_cells[lo:hi], version.patch_boxes[lo:hi]


def _patch_grid(version: LoadedVersion, doc_index: int, vector_scores: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The (rows, cols) grid with every patch cell holding its vector's score, and the page size."""
    assert version.patch_offsets is not None
    first, last = int(version.doc_offsets[doc_index]), int(version.doc_offsets[doc_index + 1])
    counts = np.diff(version.patch_offsets[first:last + 1])
    owner = np.repeat(np.arange(last - first), counts)
    cells, boxes = _doc_patches(version, doc_index)
    meta = version.metadata(doc_index)
    declared = meta.get("grid") if isinstance(meta.get("grid"), list) and len(meta["grid"]) == 2 else (0, 0)
    rows = max(int(declared[0]), int(cells[:, 0].max()) + 1)
    cols = max(int(declared[1]), int(cells[:, 1].max()) + 1)
    grid = np.full((rows, cols), np.nan, dtype=np.float32)
    grid[cells[:, 0], cells[:, 1]] = vector_scores[owner]
    width = int(meta.get("width_px") or 0) or int(boxes[:, 2].max())
    height = int(meta.get("height_px") or 0) or int(boxes[:, 3].max())
    return grid, (width, height)


def _check_query(version: LoadedVersion, query_vectors: np.ndarray, query_tokens: Sequence[str]) -> np.ndarray:
    query = np.asarray(query_vectors)
    dim = version.encoder.dim
    if query.ndim != 2 or query.shape[0] == 0 or query.shape[1] != dim:
        raise InvalidArgument(f"query vectors have shape {query.shape}, expected (n >= 1, {dim}) for index version "
                              f"{version.name}", field="query_vectors")
    if not np.issubdtype(query.dtype, np.floating) or not np.isfinite(query).all():
        raise InvalidArgument("query vectors must be finite floating-point numbers", field="query_vectors")
    if len(query_tokens) != query.shape[0]:
        raise InvalidArgument(f"{len(query_tokens)} query tokens for {query.shape[0]} query vectors",
                              field="query_tokens")
    return np.ascontiguousarray(query, dtype=np.float32)


def check_alpha(alpha: float) -> float:
    """`alpha` (heat over page) if it is a number in [0, 1], else InvalidArgument."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise InvalidArgument(f"alpha must be between 0 and 1 (the heatmap's opacity over the page), got {alpha}",
                              field="alpha")
    return float(alpha)
