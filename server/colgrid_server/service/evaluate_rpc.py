"""EvaluationService: run a judged query set on one or two versions of an index; and the status a
promote refused by its policy answers with.

An evaluation runs on the search worker pool, one query after another, each version pinned and
leased for the whole run (see colgrid_server.evaluation). If the caller goes away (cancel or
deadline), the run stops at the next query.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Executor

import grpc

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.config import Settings
from colgrid_server.errors import InvalidArgument
from colgrid_server.evaluation import (
    DEFAULT_RECALL_K, EvalOptions, Evaluation, Evaluator, check_queries)
from colgrid_server.serving import ServingState
from colgrid_server.service import convert, requests
from colgrid_server.service.status import abort_with


class EvaluationService(pb_grpc.EvaluationServiceServicer):
    def __init__(self, state: ServingState, settings: Settings, executor: Executor) -> None:
        self._evaluator = Evaluator(state)
        self._settings = settings
        self._executor = executor

    async def Evaluate(self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        stop = threading.Event()
        try:
            name = requests.index_name(request.index)
            options = self._options(request)
            queries = [convert.judged_query(q, i) for i, q in enumerate(request.queries)]
            check_queries(queries, max_query_chars=self._settings.max_query_chars)

            def run() -> list[Evaluation]:
                return self._evaluator.evaluate(name, list(request.versions), queries, query_set=request.query_set,
                                                options=options, record=request.record, stop=stop)

            try:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, run)
            except asyncio.CancelledError:
                stop.set()  # the worker stops at its next query instead of finishing for nobody
                raise
            return convert.evaluate_response(name, results)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status in one place
            await abort_with(context, exc)
            raise

    def _options(self, request: pb.EvaluateRequest) -> EvalOptions:
        k = request.k or DEFAULT_RECALL_K
        if k > self._settings.max_k:
            raise InvalidArgument(f"k={k} exceeds this server's limit of {self._settings.max_k}", field="k")

        def knob(field: str) -> int | None:
            if not request.HasField(field):
                return None
            value = getattr(request, field)
            if value <= 0:
                raise InvalidArgument(f"{field} must be a positive integer (got {value}); leave it unset for the "
                                      f"default", field=field)
            return value

        return EvalOptions(k=k, nprobe=knob("nprobe"), n_candidates=knob("n_candidates"))


