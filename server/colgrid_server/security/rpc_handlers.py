"""Plumbing the server's interceptors share: swap the behaviour of a grpc.aio method handler
(keeping its serializers and streaming shape), refuse a call with a google.rpc.Status, and read
the status a finished call ended with.

grpc.aio interceptors see a call before its handler runs; anything that must hold a resource
for the call's life, or see its responses, wraps the handler's behaviour instead.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from colgrid_server.service.status import ERROR_DOMAIN

__all__ = ["ERROR_DOMAIN", "behavior_of", "final_code", "refusal", "rich_status", "with_behavior"]

_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    attr, _ = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return getattr(handler, attr)


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of the same shape and serializers as `handler` running `behavior`."""
    _, factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(behavior, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    """A grpc.Status carrying a google.rpc.Status with `details` (as service.status does)."""
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                                                  details=packed))


def refusal(handler: grpc.RpcMethodHandler, status: grpc.Status,
            on_refuse: Callable[[grpc.aio.ServicerContext], None] | None = None) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `status` before any of the service's code runs.
    `on_refuse` sees the context first (the peer address is known only there)."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        if on_refuse is not None:
            on_refuse(context)
        await context.abort_with_status(status)

    return with_behavior(handler, refuse)


def final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ends with, given how its behaviour returned (or what it raised)."""
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions keep the raw integer
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
