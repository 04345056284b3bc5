"""Backpressure: at most worker_threads + max_queued_requests units of work in the server at
once; a new call beyond that is refused at once with RESOURCE_EXHAUSTED and a google.rpc
RetryInfo saying when to come back, instead of queueing without bound.

A unit is a unary call (held until it answers) or one message of a client stream (held until
the service asks for the next message). A new stream is refused like a new call when the
server is full; a stream already admitted waits for room before its next message (HTTP/2 flow
control then slows its sender) rather than failing half-way. Health, reflection and rollouts
are never refused: probes must answer and operators must be able to act during an overload.

Calls admitted but waiting for a worker still honour their deadlines: when one passes (or the
caller cancels), grpc cancels the call and its queued work is dropped, never computed.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from colgrid_server.config import Settings
from colgrid_server.security._roles import service_of
from colgrid_server.security.rpc_handlers import ERROR_DOMAIN, behavior_of, rich_status, with_behavior

EXEMPT_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
    "colgrid.v1.RolloutService",
})
MIN_RETRY_S = 0.05
MAX_RETRY_S = 10.0
_EWMA_WEIGHT = 0.2


class Gate:
    """Counts units of work on one event loop (no locks: only the server's loop touches it)."""

    def __init__(self, capacity: int, *, workers: int) -> None:
        if capacity < 1 or workers < 1:
            raise ValueError(f"capacity and workers must be >= 1, got {capacity}, {workers}")
        self.capacity = capacity
        self.workers = workers
        self.in_use = 0
        self.refused = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._mean_hold_s = 0.1  # until measured

    @classmethod
    def for_settings(cls, settings: Settings) -> Gate:
        return cls(settings.worker_threads + settings.max_queued_requests, workers=settings.worker_threads)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def has_room(self) -> bool:
        return self.in_use < self.capacity and not self.waiting

    def try_acquire(self) -> bool:
        if not self.has_room():
            return False
        self.in_use += 1
        return True

    async def acquire(self) -> None:
        """Wait for a unit (streams only: new calls use try_acquire and are refused instead)."""
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(None)  # handed a unit just as the call was cancelled: pass it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self, held_s: float | None) -> None:
        if held_s is not None:
            self._mean_hold_s += _EWMA_WEIGHT * (held_s - self._mean_hold_s)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the unit passes straight to the oldest waiter
                return
        self.in_use -= 1

    def retry_delay(self) -> float:
        """Roughly how long until the work in the server now has drained."""
        drain = self._mean_hold_s * (self.in_use + self.waiting) / self.workers
        return min(MAX_RETRY_S, max(MIN_RETRY_S, drain))

    def overloaded_status(self, method: str) -> grpc.Status:
        delay = self.retry_delay()
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(delay), nanos=int((delay - int(delay)) * 1e9)))
        info = error_details_pb2.ErrorInfo(reason="OVERLOADED", domain=ERROR_DOMAIN,
                                           metadata={"in_progress": str(self.in_use),
                                                     "limit": str(self.capacity)})
        message = (f"server overloaded, {method} refused: {self.in_use} requests in progress or queued, the limit is "
                   f"{self.capacity} ({self.workers} workers + max_queued_requests); retry after "
                   f"{delay:.2f}s, or add replicas")
        return rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, info, retry)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate, *, exempt: frozenset[str] = EXEMPT_SERVICES) -> None:
        self._gate = gate
        self._exempt = exempt

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) in self._exempt:
            return handler
        behavior = behavior_of(handler)
        method = handler_call_details.method.lstrip("/")
        gate = self._gate
        if handler.request_streaming:
            return with_behavior(handler, _gated_stream(gate, method, behavior, handler.response_streaming))
        return with_behavior(handler, _gated_unary(gate, method, behavior, handler.response_streaming))


async def _refuse(gate: Gate, method: str, context: grpc.aio.ServicerContext) -> None:
    gate.refused += 1
    await context.abort_with_status(gate.overloaded_status(method))


def _gated_unary(gate: Gate, method: str, behavior, response_streaming: bool):
    """One unit for the whole call; acquired when the call starts to run (a call cancelled
    before that never takes one)."""
    if response_streaming and inspect.isasyncgenfunction(behavior):
        async def stream_out(request: Any, context: grpc.aio.ServicerContext):
            if not gate.try_acquire():
                await _refuse(gate, method, context)
            started = time.monotonic()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                gate.release(time.monotonic() - started)
        return stream_out

    async def unary_out(request: Any, context: grpc.aio.ServicerContext):
        if not gate.try_acquire():
            await _refuse(gate, method, context)
        started = time.monotonic()
        try:
            return await behavior(request, context)
        finally:
            gate.release(time.monotonic() - started)
    return unary_out


class _GatedRequests:
    """A client stream whose every message holds a unit until the next one is asked for."""

    def __init__(self, gate: Gate, requests: AsyncIterator[Any]) -> None:
        self._gate = gate
        self._requests = requests.__aiter__()
        self._held_since: float | None = None

    def __aiter__(self) -> _GatedRequests:
        return self

    async def __anext__(self) -> Any:
        self.release()
        request = await self._requests.__anext__()  # StopAsyncIteration ends the stream
        await self._gate.acquire()
        self._held_since = time.monotonic()
        return request

    def release(self) -> None:
        if self._held_since is not None:
            self._gate.release(time.monotonic() - self._held_since)
            self._held_since = None


def _gated_stream(gate: Gate, method: str, behavior, response_streaming: bool):
    if response_streaming and inspect.isasyncgenfunction(behavior):
        async def stream_out(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
            if not gate.has_room():
                await _refuse(gate, method, context)
            gated = _GatedRequests(gate, requests)
            try:
                async for response in behavior(gated, context):
                    yield response
            finally:
                gated.release()
        return stream_out

    async def unary_out(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext):
        if not gate.has_room():
            await _refuse(gate, method, context)
        gated = _GatedRequests(gate, requests)
        try:
            return await behavior(gated, context)
        finally:
            gated.release()
    return unary_out
