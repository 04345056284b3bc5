"""RolloutService (admin): read and change an index's rollout, wait for replicas to follow.

A change is made by `RolloutChanges` (checks, compare-and-set, applied here at once). With
wait_for_replicas_s the answer waits until every live replica reports the new generation by
heartbeat, or the wait runs out: the change stands either way and the answer lists the replicas
still pending (a timed-out wait is a partial success, not an error).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

import grpc

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_registry import Rollout
from colgrid_server.errors import InvalidArgument
from colgrid_server.evaluation import PromotePolicy, gate_promotion
from colgrid_server.serving import Change, Replica, RolloutChanges, ServingState
from colgrid_server.service import convert, requests
from colgrid_server.service.status import abort_with

DEFAULT_HISTORY = 20
MAX_HISTORY = 1000
MAX_WAIT_S = 600.0
WAIT_POLL_S = 0.05


class RolloutService(pb_grpc.RolloutServiceServicer):
    def __init__(self, state: ServingState, replica: Replica, executor: Executor) -> None:
        self._state = state
        self._registry = state.registry
        self._replica = replica
        self._changes = RolloutChanges(state, replica)
        self._executor = executor

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _answer(self, context: grpc.aio.ServicerContext, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self._run(fn, *args)
        except Exception as exc:  # noqa: BLE001 - one error table for every RPC
            await abort_with(context, exc)
            raise

    # --- reads ----------------------------------------------------------------------------------

    async def GetRollout(self, request: pb.GetRolloutRequest, context) -> pb.RolloutStatus:
        def run() -> pb.RolloutStatus:
            name = requests.index_name(request.index)
            return self._status(self._registry.get_rollout(name))
        return await self._answer(context, run)

    async def RolloutHistory(self, request: pb.RolloutHistoryRequest, context) -> pb.RolloutHistoryResponse:
        def run() -> pb.RolloutHistoryResponse:
            name = requests.index_name(request.index)
            limit = request.limit or DEFAULT_HISTORY
            if limit > MAX_HISTORY:
                raise InvalidArgument(f"limit {limit} exceeds {MAX_HISTORY}", field="limit")
            entries = self._registry.audit_log(name, limit)
            return pb.RolloutHistoryResponse(entries=[convert.audit_entry(e) for e in entries])
        return await self._answer(context, run)

    def _status(self, rollout: Rollout) -> pb.RolloutStatus:
        index = rollout.index
        return convert.rollout_status(
            rollout, self._replica.acknowledgements(index, rollout.generation),
            replica_id=self._replica.replica_id,
            served_generation=self._state.served_generations().get(index),
            shadow=self._state.shadow.stats(index), failures=self._state.load_failures(index),
            versions=self._state.versions_held(index))

    # --- changes --------------------------------------------------------------------------------

    async def StartCanary(self, request: pb.StartCanaryRequest, context) -> pb.RolloutStatus:
        return await self._change(context, request, lambda name, change: self._changes.start_canary(
            name, _version(request), request.percent, change))

    async def SetCanaryPercent(self, request: pb.SetCanaryPercentRequest, context) -> pb.RolloutStatus:
        return await self._change(context, request, lambda name, change: self._changes.set_canary_percent(
            name, request.percent, change))

    async def SetShadow(self, request: pb.SetShadowRequest, context) -> pb.RolloutStatus:
        percent = request.percent if request.HasField("percent") else 100
        return await self._change(context, request, lambda name, change: self._changes.set_shadow(
            name, _version(request), percent, change))

    async def ClearShadow(self, request: pb.ClearShadowRequest, context) -> pb.RolloutStatus:
        return await self._change(context, request, self._changes.clear_shadow)

    async def Promote(self, request: pb.PromoteRequest, context) -> pb.RolloutStatus:
        def promote(name: str, change: Change) -> Rollout:
            policy = convert.promote_policy(request)
            return self._changes.promote(name, self._gate(name, change, policy) if policy else change)
        return await self._change(context, request, promote)

    def _gate(self, name: str, change: Change, policy: PromotePolicy) -> Change:
        """Check `policy` on the rollout as it is now (PromoteRefused names the failed rule), and
        promote that rollout only: a change landing in between makes the promote ABORTED."""
        rollout = self._registry.get_rollout(name)
        if change.expected_generation not in (None, rollout.generation):
            return change  # refused as a generation conflict, policy unchecked
        gate_promotion(self._registry, rollout, policy, self._state.shadow.stats(name))
        return replace(change, expected_generation=rollout.generation)

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.RolloutStatus:
        return await self._change(context, request, self._changes.rollback)

    async def AbortCanary(self, request: pb.AbortCanaryRequest, context) -> pb.RolloutStatus:
        return await self._change(context, request, self._changes.abort_canary)

    async def SetStable(self, request: pb.SetStableRequest, context) -> pb.RolloutStatus:
        return await self._change(context, request, lambda name, change: self._changes.set_stable(
            name, _version(request), change))

    async def _change(self, context: grpc.aio.ServicerContext, request: Any,
                      apply: Callable[[str, Change], Rollout]) -> pb.RolloutStatus:
        try:
            name = requests.index_name(request.index)
            change = Change(
                expected_generation=request.expected_generation if request.HasField("expected_generation") else None,
                actor=request.actor, reason=request.reason)
            wait = _wait_seconds(request)
            after: Rollout = await self._run(apply, name, change)
            if wait:
                await self._wait_for_replicas(name, after.generation, wait)
            return await self._run(self._status, after)
            raise
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
            raise

    async def _wait_for_replicas(self, index: str, generation: int, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            acks = await self._run(self._replica.acknowledgements, index, generation)
            remaining = deadline - loop.time()
            if not acks.pending or remaining <= 0:
                return
            await asyncio.sleep(min(WAIT_POLL_S, remaining))


def _version(request: Any) -> str:
    if not request.version:
        raise InvalidArgument("version is required (e.g. v2); see ListVersions", field="version")
    return request.version


def _wait_seconds(request: Any) -> float:
    if not request.HasField("wait_for_replicas_s"):
        return 0.0
    seconds = request.wait_for_replicas_s
    if not 0 <= seconds <= MAX_WAIT_S:
        raise InvalidArgument(f"wait_for_replicas_s must be between 0 and {MAX_WAIT_S:g} seconds, got {seconds}",
                              field="wait_for_replicas_s")
    return seconds
