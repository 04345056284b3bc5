"""SearchService: unary Search, the bidirectional SearchStream, and Explain (in explain_rpc).

Each request is routed once (a stream once, on its first request) and holds a lease on the
version answering it until its work finishes, even if the caller goes away first: the version
cannot be unloaded under it. Shadow work is handed off after the answer is computed and never
affects it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.config import Settings
from colgrid_server.errors import FailedPrecondition
from colgrid_server.serving import Answer, Lease, Query, Route, ServedVersion, ServingState
from colgrid_server.service import convert, explain_rpc, requests
from colgrid_server.service.status import abort_with

log = logging.getLogger(__name__)


class SearchService(pb_grpc.SearchServiceServicer):
    def __init__(self, state: ServingState, settings: Settings, executor: Executor) -> None:
        self._state = state
        self._settings = settings
        self._executor = executor

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        try:
            name = requests.index_name(request.index)
            requests.search_params(request, self._settings)  # refuse bad knobs before routing
            route = self._state.route(name, request.routing_key)  # resolved once
            try:
                query = requests.query(request, self._settings, dim=route.version.encoder.dim)
            except BaseException:
                route.release()
                raise
            try:
                answer = await self._answer(route.primary, query)
            except BaseException:
                if route.shadow is not None:
                    route.shadow.release()
                raise
            self._shadow(route, route.shadow, query, answer)
            self._sample_recall(route.version, query, answer)
            return self._response(request, route, answer)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status in one place
            await abort_with(context, exc)
            raise  # unreachable: abort raises

    async def SearchStream(self, request_iterator: AsyncIterator[pb.SearchRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SearchResponse]:
        # Each index named on this stream is routed on first use (by that request's routing key)
        # and pinned for the stream's life: a rollout mid-stream never changes what it reads.
        pinned: dict[str, Route] = {}
        try:
            async for request in request_iterator:
                name = requests.index_name(request.index)
                route = pinned.get(name)
                if route is None:
                    requests.search_params(request, self._settings)
                    route = pinned[name] = self._state.route(name, request.routing_key, shadow=False)
                query = requests.query(request, self._settings, dim=route.version.encoder.dim)
                lease = route.version.acquire()  # the stream's own lease keeps it open
                if lease is None:
                    raise FailedPrecondition(f"{name}/{route.version.version} was unloaded under an open stream")
                answer = await self._answer(lease, query)
                self._shadow(route, self._state.shadow_for(name), query, answer)
                self._sample_recall(route.version, query, answer)
                yield self._response(request, route, answer)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
        finally:
            for route in pinned.values():
                route.release()

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        """One document's score, per-token matches and (pages) patch scores / heatmap: see explain_rpc."""
        try:
            return await explain_rpc.explain(self._state, self._settings, self._executor, request)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
            raise

    async def _answer(self, lease: Lease, query: Query) -> Answer:
        """Search on the worker pool; the lease ends when the work does (not when the caller
        stops waiting), so a cancelled request never frees a version still being read."""
        try:
            future = self._executor.submit(lease.version.search, query)
        except BaseException:
            lease.release()
            raise
        future.add_done_callback(lambda _: lease.release())
        return await asyncio.wrap_future(future)

    def _shadow(self, route: Route, shadow: Lease | None, query: Query, answer: Answer) -> None:
        if shadow is None:
            return
        try:
            self._state.shadow.submit(shadow, query, route.version.version, answer)
        except Exception:  # noqa: BLE001 - shadow trouble must never reach the caller
            shadow.release()
            log.exception("could not hand a query to the shadow runner")

    def _sample_recall(self, served: ServedVersion, query: Query, answer: Answer) -> None:
        """For a sampled share of searches, the same query on the same version, exhaustively,
        after the answer went out: its overlap@k is the live recall (colgrid_sampled_recall)."""
        rate = self._settings.recall_sample_rate
        if not rate or query.exhaustive or random.random() >= rate:
            return
        lease = served.acquire()
        if lease is None:  # unloaded meanwhile: nothing to compare with
            return
        try:
            self._state.recall.submit(lease, dataclasses.replace(query, exhaustive=True), served.version, answer)
        except Exception:  # noqa: BLE001 - sampling must never reach the caller
            lease.release()
            log.exception("could not hand a query to the recall sampler")

    @staticmethod
    def _response(request: pb.SearchRequest, route: Route, answer: Answer) -> pb.SearchResponse:
        served = route.version
        return convert.search_response(
            request_id=request.request_id, index=served.index, version=served.version,
            encoder_id=served.encoder_id, result=answer.result, encode_ms=answer.encode_ms,
            total_ms=answer.total_ms, generation=route.generation, role=route.role)
