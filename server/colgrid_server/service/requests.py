"""Validation of incoming requests against the server's limits, before any work is done."""
from __future__ import annotations

import numpy as np

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_server.config import Settings
from colgrid_server.errors import InvalidArgument, ResourceExhausted
from colgrid_server.search import SearchParams
from colgrid_server.serving import Query
from colgrid_server.service.convert import filter_from_pb, matrix_from_pb


def index_name(name: str, *, field: str = "index") -> str:
    if not name:
        raise InvalidArgument(f"{field} is required: name the index to search (see `colgrid registry list`)",
                              field=field)
    return name


def search_params(req: pb.SearchRequest, settings: Settings) -> SearchParams:
    def knob(name: str) -> int | None:
        if not req.HasField(name):
            return None
        value = getattr(req, name)
        if value <= 0:
            raise InvalidArgument(f"{name} must be a positive integer (got {value}); leave it unset for the default",
                                  field=name)
        return value

    k = knob("k")
    if k is not None and k > settings.max_k:
        raise InvalidArgument(f"k={k} exceeds this server's limit of {settings.max_k}", field="k")
    return SearchParams.from_request(k=k, nprobe=knob("nprobe"), n_candidates=knob("n_candidates"),
                                     explain=req.explain)


def query_text(req: pb.SearchRequest, settings: Settings) -> str:
    text = req.query
    if not text.strip():
        raise InvalidArgument("query is empty: send query text or query_vectors", field="query")
    if len(text) > settings.max_query_chars:
        raise InvalidArgument(f"query has {len(text)} characters; the limit is {settings.max_query_chars}",
                              field="query")
    return text


def query_vectors(req: pb.SearchRequest, dim: int) -> np.ndarray:
    if req.query.strip():
        raise InvalidArgument("send either query text or query_vectors, not both", field="query_vectors")
    return matrix_from_pb(req.query_vectors, field="query_vectors", expected_dim=dim)


def query(req: pb.SearchRequest, settings: Settings, *, dim: int) -> Query:
    """The domain query of a search request; `dim` is the answering version's encoder dim."""
    params = search_params(req, settings)
    where = filter_from_pb(req.filter) if req.HasField("filter") else None
    if req.HasField("query_vectors"):
        return Query(params=params, vectors=query_vectors(req, dim), exhaustive=req.exhaustive, where=where)
    return Query(params=params, text=query_text(req, settings), exhaustive=req.exhaustive, where=where)


def encode_texts(texts: list[str], settings: Settings, *, field: str = "texts") -> list[str]:
    if not texts:
        raise InvalidArgument(f"{field} is empty: send at least one text", field=field)
    if len(texts) > settings.max_encode_texts:
        raise ResourceExhausted(f"{len(texts)} texts in one request; the limit is {settings.max_encode_texts}: "
                                f"split the request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"{field}[{i}] is empty", field=f"{field}[{i}]")
        if len(text) > settings.max_query_chars * 64:
            raise InvalidArgument(f"{field}[{i}] has {len(text)} characters; the limit is "
                                  f"{settings.max_query_chars * 64}", field=f"{field}[{i}]")
    return texts
