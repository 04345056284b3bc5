"""API key authentication and role checks for every call, before any service code runs.

A caller sends `authorization: Bearer <key>` (or `x-api-key: <key>`). Missing or unknown keys
are UNAUTHENTICATED; a known key whose roles do not cover the method is PERMISSION_DENIED.
Health and reflection stay open. Refusals are logged with the key's name (never the key), the
method and the peer.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2

from colgrid_server.observability._context import caller
from colgrid_server.security._keys import KeyStore, hash_key
from colgrid_server.security._roles import is_open, required_role
from colgrid_server.security.rpc_handlers import ERROR_DOMAIN, refusal, rich_status

log = logging.getLogger("colgrid_server.security.auth")

HOW_TO_SEND = "send metadata 'authorization: Bearer <key>' (colgrid_client: Client(target, api_key=...))"


# Refuses without reading a message, so it suits a call of any shape.
_ANY_SHAPE = grpc.stream_stream_rpc_method_handler(lambda requests, context: None)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if is_open(method):
            return handler
        # Methods this server lacks are refused like the rest until the caller is known: an
        # unauthenticated caller learns nothing, an authorised one gets UNIMPLEMENTED.
        shape = handler or _ANY_SHAPE
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        presented, problem = presented_key(metadata)
        if presented is None:
            return self._refuse(shape, method, grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING",
                                f"{problem}: {HOW_TO_SEND}", key_name="-")
        key = self._keys.find(presented)
        if key is None:
            # A fingerprint of what was sent lets an operator match repeated failures without
            # the log ever holding a usable key.
            return self._refuse(shape, method, grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID",
                                "API key not recognised (revoked, mistyped, or issued for another "
                                "server); ask an operator for a key (`colgrid keys create`)",
                                key_name="-", fingerprint=hash_key(presented)[:8])
        role = required_role(method)
        if role is None or role not in key.roles:
            need = (f"it needs the {role!r} role: use a key created with --role {role}" if role
                    else "no role grants it on this server")
            return self._refuse(shape, method, grpc.StatusCode.PERMISSION_DENIED, "ROLE_MISSING",
                                f"API key {key.name!r} (roles: {', '.join(sorted(key.roles))}) may not "
                                f"call {method.lstrip('/')}: {need}",
                                key_name=key.name, required_role=role or "")
        caller.set(key.name)
        return handler

    @staticmethod
    def _refuse(handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, reason: str,
                message: str, *, key_name: str, fingerprint: str = "", required_role: str = ""):
        info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
        if required_role:
            info.metadata["required_role"] = required_role
        status = rich_status(code, message, info)

        def record(context: grpc.aio.ServicerContext) -> None:
            log.warning("refused %s from %s: %s %s (key %s%s)", method.lstrip("/"), context.peer(), code.name,
                        reason, key_name, f", sent sha256 {fingerprint}…" if fingerprint else "",
                        extra={"method": method.lstrip("/"), "peer": context.peer(), "code": code.name,
                               "reason": reason, "key_name": key_name, "key_fingerprint": fingerprint})

        return refusal(handler, status, record)


def presented_key(metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(key, "") from `authorization: Bearer <key>` or `x-api-key`, else (None, what is wrong)."""
    auth = metadata.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None, "the authorization metadata must be 'Bearer <api key>'"
        return value.strip(), ""
    key = (metadata.get("x-api-key") or "").strip()
    if key:
        return key, ""
    return None, "this server requires an API key"
