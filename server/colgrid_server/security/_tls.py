"""Where the server listens and how: TLS from PEM files (mutual TLS when a client CA is set),
plaintext otherwise, and the warnings an operator must see when that is risky."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from colgrid_server.config import Settings
from colgrid_server.errors import FailedPrecondition


def _read(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"cannot read {setting} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise FailedPrecondition(f"{setting} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from settings (None: plaintext). With tls_client_ca, every client must
    present a certificate signed by that CA (the handshake fails otherwise)."""
    if not settings.tls_cert:
        return None
    cert = _read(settings.tls_cert, "tls_cert")
    key = _read(settings.tls_key, "tls_key")
    client_ca = _read(settings.tls_client_ca, "tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Listen on settings.target, with TLS when configured; the port bound (0 on failure)."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(settings.target)
    return server.add_secure_port(settings.target, credentials)


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a hostname or "" (all interfaces): assume reachable from elsewhere


def startup_warnings(settings: Settings, port: int) -> list[str]:
    """What is unsafe about this configuration, one sentence each (empty when nothing is)."""
    if is_loopback(settings.host):
        return []
    where = f"{settings.host or '*'}:{port}"
    warnings = []
    if not settings.api_keys_file:
        warnings.append(f"listening on {where} without authentication: anyone who can reach it can "
                        f"search, ingest and change rollouts; set COLGRID_API_KEYS_FILE "
                        f"(`colgrid keys create`)")
    if not settings.tls_cert:
        warnings.append(f"listening on {where} without TLS: queries"
                        + (", results and API keys" if settings.api_keys_file else " and results")
                        + " cross the network in plaintext; set COLGRID_TLS_CERT and COLGRID_TLS_KEY")
    return warnings
