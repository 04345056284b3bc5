"""Requests whose bytes are not a valid protobuf message (corrupt, truncated, invalid UTF-8 in a
string field) are INVALID_ARGUMENT naming the message type, not UNKNOWN or INTERNAL.

grpc parses a request before any handler runs and reports a parse failure as an unhandled
exception. This interceptor swaps each handler's parser for one that returns a `Malformed`
marker instead of raising; the call then ends INVALID_ARGUMENT (unary requests) or the request
iterator raises InvalidArgument at that message (streams), which the services map like any
other bad input.
"""
from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from colgrid_server.errors import InvalidArgument
from colgrid_server.service.status import abort_with

_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


@dataclass(frozen=True)
class Malformed:
    method: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request to {self.method} is not a valid protobuf message ({self.reason}); "
                               "send a message built from colgrid.v1 (protos/colgrid/v1/colgrid.proto)",
                               field="request")


def _tolerant(parse: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Malformed(method, str(exc) or type(exc).__name__)

    return parse_or_mark


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise request.error()
        yield request


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming behaviour's responses: it may be an async generator, or a coroutine that
    writes with context.write or ends the call (an interceptor's refusal) and returns None."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
        attr, factory = _FACTORIES[streaming]
        inner = getattr(handler, attr)
        method = handler_call_details.method.rsplit("/", 1)[-1]

        if not handler.request_streaming and not handler.response_streaming:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await abort_with(context, request.error())
                return await inner(request, context)
        elif not handler.request_streaming:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                if isinstance(request, Malformed):
                    await abort_with(context, request.error())
                async for response in _responses(inner(request, context)):
                    yield response
        elif not handler.response_streaming:
            async def behavior(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                return await inner(_checked(requests), context)
        else:
            async def behavior(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                async for response in _responses(inner(_checked(requests), context)):
                    yield response

        return factory(behavior, request_deserializer=_tolerant(handler.request_deserializer, method),
                       response_serializer=handler.response_serializer)
