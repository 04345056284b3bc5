"""deploy/docker-entrypoint.sh, run directly (as the image runs it) with the venv's colgrid on
PATH: argument routing, the healthcheck verb, and a replica pair configured like compose.yaml's
(COLGRID_* only, one PostgreSQL registry) from start to SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from colgrid_registry import open_registry
from tests.postgres_server import create_database, drop_database

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
GRACE_SECONDS = 1.0
STARTUP_TIMEOUT_S = 120.0


def entrypoint_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLGRID_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", COLGRID_DATA_DIR=str(data_dir),
               COLGRID_HOST="127.0.0.1", COLGRID_PORT=str(port), COLGRID_METRICS_PORT="0",
               COLGRID_GRACE_SECONDS=str(GRACE_SECONDS), COLGRID_REGISTRY_POLL_SECONDS="0.5")
    env.update(extra)
    return env


def run_entrypoint(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> int | None:
    """The overall service's status, or None while nothing answers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None


def launch(tmp_path: Path, *args: str, **extra: str) -> tuple[subprocess.Popen, int, dict[str, str]]:
    port = free_port()
    env = entrypoint_env(tmp_path / "data", port, **extra)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, port, env


def wait_serving(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while health(port) != health_pb2.HealthCheckResponse.SERVING:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not become SERVING:\n{log.read_text()}")
        time.sleep(0.2)


def start_server(tmp_path: Path, *args: str, **extra: str) -> tuple[subprocess.Popen, int, dict[str, str]]:
    proc, port, env = launch(tmp_path, *args, **extra)
    wait_serving(proc, port, tmp_path / "server.log")
    return proc, port, env


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=GRACE_SECONDS + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[dict[str, tuple[subprocess.Popen, int, dict[str, str]]]]:
    """What compose.yaml runs: two servers with distinct COLGRID_REPLICA_ID on one PostgreSQL
    registry, each with its own data dir; colgrid-a exports metrics, as the image does
    (COLGRID_METRICS_PORT=9090 there, a free port here)."""
    url = create_database()
    servers, logs = {}, {}
    for replica in ("colgrid-a", "colgrid-b"):
        home = tmp_path_factory.mktemp(replica)
        metrics = {"COLGRID_METRICS_PORT": str(free_port())} if replica == "colgrid-a" else {}
        servers[replica] = launch(home, COLGRID_REPLICA_ID=replica, COLGRID_REGISTRY_URL=url, **metrics)
        logs[replica] = home / "server.log"
    try:
        for replica, (proc, port, _) in servers.items():
            wait_serving(proc, port, logs[replica])
        yield servers
    finally:
        for proc, _, _ in servers.values():
            stop(proc)
        drop_database(url)


# ---------------------------------------------------------------------------- argument routing

def test_colgrid_commands_pass_through(tmp_path):
    result = run_entrypoint("colgrid", "--help", env=entrypoint_env(tmp_path, 0))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: colgrid [-h] VERB")


def test_a_bare_verb_is_a_colgrid_command(tmp_path):
    result = run_entrypoint("rollout", "promote", "--help", env=entrypoint_env(tmp_path, 0))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: colgrid rollout promote")


def test_flags_alone_are_serve_flags(tmp_path):
    result = run_entrypoint("--help", env=entrypoint_env(tmp_path, 0))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: colgrid serve")


def test_other_programs_run_as_given(tmp_path):
    result = run_entrypoint("python", "-c", "import sys; print(sys.prefix)", env=entrypoint_env(tmp_path, 0))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == sys.prefix


def test_an_invalid_setting_fails_with_a_readable_error(tmp_path):
    result = run_entrypoint(env=entrypoint_env(tmp_path, free_port(), COLGRID_DEVICE="gpu"))
    assert result.returncode == 1
    assert "device must be auto, cpu or cuda, not 'gpu'" in result.stderr
    assert "Traceback" not in result.stderr


def test_healthcheck_fails_when_nothing_listens(tmp_path):
    result = run_entrypoint("healthcheck", "1", env=entrypoint_env(tmp_path, free_port()))
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


# --------------------------------------------------------------------------------- serving

def test_no_arguments_serve_with_settings_from_the_environment(pair):
    proc, port, env = pair["colgrid-a"]
    assert proc.poll() is None
    assert health(port) == health_pb2.HealthCheckResponse.SERVING
    assert Path(env["COLGRID_DATA_DIR"]).is_dir()
    assert not (Path(env["COLGRID_DATA_DIR"]) / "registry.db").exists()  # COLGRID_REGISTRY_URL won


def test_the_server_replaces_the_script_so_signals_reach_it(pair):
    proc, _, _ = pair["colgrid-a"]
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert not any(b"docker-entrypoint.sh" in arg for arg in argv)
    assert b"serve" in argv


def test_metrics_are_exported_on_the_metrics_port(pair):
    _, _, env = pair["colgrid-a"]
    url = f"http://127.0.0.1:{env['COLGRID_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        assert "# TYPE" in reply.read().decode()


def test_healthcheck_passes_against_a_serving_server(pair):
    _, _, env = pair["colgrid-a"]
    result = run_entrypoint("healthcheck", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("SERVING")


def test_replicas_report_to_the_shared_registry_under_their_own_ids(pair):
    with open_registry(pair["colgrid-a"][2]["COLGRID_REGISTRY_URL"]) as registry:
        live = {r.replica_id: r.address for r in registry.list_replicas() if r.live}
    assert set(live) == {"colgrid-a", "colgrid-b"}
    assert {replica: address.rsplit(":", 1)[1] for replica, address in live.items()} == {
        replica: str(port) for replica, (_, port, _) in pair.items()}


def test_sigterm_drains_exits_zero_and_leaves_the_registry(pair):
    # Stops colgrid-b only: the tests above use colgrid-a or run before this one.
    proc, port, env = pair["colgrid-b"]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert stop(proc) == 0
    assert time.monotonic() - started < GRACE_SECONDS + 10
    assert health(port) is None
    with open_registry(env["COLGRID_REGISTRY_URL"]) as registry:
        assert [r.replica_id for r in registry.list_replicas()] == ["colgrid-a"]
