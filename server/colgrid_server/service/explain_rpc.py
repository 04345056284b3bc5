"""SearchService.Explain: why one document scored what it did for a query, and (for pages) a
heatmap of where on the page it matched.

The version is resolved once, as Search resolves it (routing key, stable or canary), or pinned
by name when the request names one (it must be loaded on this server: Explain never loads a
version). The query is encoded with that version's encoder and the work runs on the search
pool under a lease, like a search.

Statuses: INVALID_ARGUMENT for an empty index / doc_id / query, a query_token outside the
query's tokens, or alpha outside [0, 1]; NOT_FOUND for an unknown index, version or document
(the message names the document and index/version); FAILED_PRECONDITION for a named version
not loaded here, or a heatmap asked of a version that kept no page image. `render` on a text
document is not an error: the answer simply carries no PNG (heatmap_png is documented as set
for image documents only), so a caller can explain any hit with the same request.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_server.config import Settings
from colgrid_server.errors import InvalidArgument
from colgrid_server.search import (
    DEFAULT_ALPHA, DocumentExplanation, check_alpha, explain_document, find_document, render_explanation_png)
from colgrid_server.serving import Lease, ServedVersion, ServingState
from colgrid_server.service import convert, requests


@dataclass(frozen=True)
class ExplainQuery:
    """An Explain request as the domain sees it, validated before any version is leased."""

    doc_id: str
    text: str | None
    vectors: np.ndarray | None = field(default=None, compare=False, repr=False)
    query_token: int | None = None
    render: bool = False
    alpha: float = DEFAULT_ALPHA


async def explain(state: ServingState, settings: Settings, executor: Executor,
                  request: pb.ExplainRequest) -> pb.ExplainResponse:
    """Answer one Explain request; domain errors propagate for the caller to map to statuses."""
    name = requests.index_name(request.index)
    doc_id, token, alpha = _doc_id(request.doc_id), _query_token(request), _alpha(request.alpha)
    lease = _lease(state, name, request)
    try:
        served = lease.version
        if request.HasField("query_vectors"):
            query = ExplainQuery(doc_id, None, requests.query_vectors(request, served.encoder.dim), token,
                                 request.render, alpha)
        else:
            query = ExplainQuery(doc_id, requests.query_text(request, settings), None, token, request.render, alpha)
        future = executor.submit(run, served, query)
    except BaseException:
        lease.release()
        raise
    # The lease ends when the work does, not when the caller stops waiting (see search_rpc).
    future.add_done_callback(lambda _: lease.release())
    explanation, png = await asyncio.wrap_future(future)
    return explain_response(served, explanation, png)


def run(served: ServedVersion, query: ExplainQuery) -> tuple[DocumentExplanation, bytes]:
    """Encode with the version's own encoder, explain, and render when asked (pages only)."""
    version = served.loaded
    doc_index = find_document(version, query.doc_id, index=served.index)
    if query.vectors is not None:
        vectors: np.ndarray = query.vectors
        tokens: Sequence[str] = [f"q{i}" for i in range(vectors.shape[0])]
    else:
        encoded = served.encoder.encode_queries([query.text])[0]
        vectors, tokens = encoded.vectors, encoded.tokens
    explanation = explain_document(version, vectors, tokens, doc_index, query_token=query.query_token,
                                   block_tokens=served.searcher.block_tokens)  # the kernel as its searches run it
    png = b""
    if query.render and explanation.patch_scores is not None:
        png = render_explanation_png(version, doc_index, explanation, query.alpha)
    return explanation, png


def explain_response(served: ServedVersion, e: DocumentExplanation, png: bytes) -> pb.ExplainResponse:
    response = pb.ExplainResponse(index=served.index, version=served.version, doc_id=e.doc_id, score=e.score,
                                  matches=[convert.token_match(m) for m in e.matches], kind=e.kind,
                                  heatmap_png=png, encoder_id=served.encoder_id)
    if e.grid is not None and e.patch_scores is not None and e.page_size is not None:
        response.grid_rows, response.grid_cols = e.grid
        response.width, response.height = e.page_size
        response.patch_scores.extend(e.patch_scores.reshape(-1).tolist())
    return response


def _lease(state: ServingState, index: str, request: pb.ExplainRequest) -> Lease:
    if request.version:
        return state.lease_version(index, request.version)
    return state.route(index, request.routing_key, shadow=False).primary  # resolved once, no shadow work


def _doc_id(doc_id: str) -> str:
    if not doc_id:
        raise InvalidArgument("doc_id is required: name the document to explain (a hit's doc_id)", field="doc_id")
    return doc_id


def _query_token(request: pb.ExplainRequest) -> int | None:
    if not request.HasField("query_token"):
        return None
    if request.query_token < 0:
        raise InvalidArgument(f"query_token must be 0 or more (a position in the query), got {request.query_token}",
                              field="query_token")
    return request.query_token  # its upper bound is known once the query is encoded


def _alpha(alpha: float) -> float:
    return DEFAULT_ALPHA if alpha == 0.0 else check_alpha(alpha)  # 0: unset on the wire
