"""SearchService: unary Search and the bidirectional SearchStream."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.config import Settings
from colgrid_server.serving import ServedVersion, ServingState
from colgrid_server.service import convert, requests
from colgrid_server.service.status import abort_with


class SearchService(pb_grpc.SearchServiceServicer):
    def __init__(self, state: ServingState, settings: Settings, executor: Executor) -> None:
        self._state = state
        self._settings = settings
        self._executor = executor

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        try:
            served = self._state.resolve(requests.index_name(request.index))  # resolved once
            return await self._run(served, request)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status in one place
            await abort_with(context, exc)
            raise  # unreachable: abort raises

    async def SearchStream(self, request_iterator: AsyncIterator[pb.SearchRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SearchResponse]:
        # Each index named on this stream is resolved on first use and pinned for the stream's
        # life: a rollout mid-stream never changes the version a stream reads.
        pinned: dict[str, ServedVersion] = {}
        try:
            async for request in request_iterator:
                name = requests.index_name(request.index)
                served = pinned.get(name)
                if served is None:
                    served = pinned[name] = self._state.resolve(name)
                yield await self._run(served, request)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def _run(self, served: ServedVersion, request: pb.SearchRequest) -> pb.SearchResponse:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._search, served, request)

    def _search(self, served: ServedVersion, request: pb.SearchRequest) -> pb.SearchResponse:
        started = time.perf_counter()
        params = requests.search_params(request, self._settings)
        if request.HasField("query_vectors"):
            vectors = requests.query_vectors(request, served.loaded.encoder.dim)
            tokens = [f"q{i}" for i in range(vectors.shape[0])]
        else:
            encoded = served.encoder.encode_queries([requests.query_text(request, self._settings)])[0]
            vectors, tokens = encoded.vectors, encoded.tokens
        encode_ms = (time.perf_counter() - started) * 1000
        searcher = served.searcher
        result = (searcher.exhaustive(vectors, tokens, params) if request.exhaustive
                  else searcher.search(vectors, tokens, params))
        return convert.search_response(
            request_id=request.request_id, index=served.index, version=served.version,
            encoder_id=served.encoder_id, result=result, encode_ms=encode_ms,
            total_ms=(time.perf_counter() - started) * 1000)
