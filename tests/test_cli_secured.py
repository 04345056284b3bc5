"""The client verbs of `colgrid` reach a secured server: API key by flag or COLGRID_API_KEY,
TLS by a trusted CA (and a client certificate for mutual TLS)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colgrid_server.security import create_key
from tests.conftest import start_live_server, stop_live_server
from tests.test_tls import issue, make_ca


def colgrid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "colgrid_server.cli", *args], capture_output=True, text=True,
                          timeout=120, env=full)


@pytest.fixture(scope="module")
def secured_tls(tmp_path_factory, served_data_dir):
    """TLS (server CA) + mutual TLS (client CA) + API keys, on the shared `docs` index."""
    pki = tmp_path_factory.mktemp("cli-pki")
    server_ca, client_ca = make_ca("cli server CA"), make_ca("cli client CA")
    server_cert, server_key = issue(server_ca, "colgrid", server=True).write(pki, "server")
    client_cert, client_key = issue(client_ca, "cli", server=False).write(pki, "client")
    (pki / "ca.crt").write_bytes(server_ca.cert)
    (pki / "client-ca.crt").write_bytes(client_ca.cert)
    keys = pki / "keys.json"
    search_key = create_key(keys, "cli-search", ["search"])
    admin_key = create_key(keys, "cli-admin", ["admin"])
    server, thread = start_live_server(served_data_dir, api_keys_file=str(keys), tls_cert=server_cert,
                                       tls_key=server_key, tls_client_ca=str(pki / "client-ca.crt"))
    tls = ["--target", f"localhost:{server.port}", "--tls-ca", str(pki / "ca.crt"),
           "--tls-client-cert", client_cert, "--tls-client-key", client_key]
    yield {"tls": tls, "search_key": search_key, "admin_key": admin_key}
    stop_live_server(server, thread)


def test_search_with_a_search_key_over_mutual_tls(secured_tls) -> None:
    proc = colgrid("search", "docs", "parse a JSON document", "-k", "3", *secured_tls["tls"],
                   "--api-key", secured_tls["search_key"])
    assert proc.returncode == 0, proc.stderr
    assert "docs@" in proc.stdout and "3 hits" in proc.stdout


def test_the_api_key_can_come_from_the_environment(secured_tls) -> None:
    proc = colgrid("rollout", "status", "docs", *secured_tls["tls"], env={"COLGRID_API_KEY": secured_tls["admin_key"]})
    assert proc.returncode == 0, proc.stderr
    assert "stable" in proc.stdout


def test_without_a_key_the_cli_says_it_is_unauthenticated(secured_tls) -> None:
    proc = colgrid("search", "docs", "parse a JSON document", *secured_tls["tls"])
    assert proc.returncode == 1
    assert "API key" in proc.stderr or "UNAUTHENTICATED" in proc.stderr.upper()


def test_a_search_key_cannot_change_rollouts(secured_tls) -> None:
    proc = colgrid("rollout", "rollback", "docs", *secured_tls["tls"], "--api-key", secured_tls["search_key"])
    assert proc.returncode == 1
    assert "admin" in proc.stderr
