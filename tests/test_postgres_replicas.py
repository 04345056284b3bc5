"""Two `colgrid serve` processes sharing one PostgreSQL registry (and one data dir for the index
files) follow a rollout changed through either of them, and the change's answer reports both
acknowledgements."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from colgrid_client import Client
from colgrid_registry import open_registry
from colgrid_server.builder import build_index
from colgrid_server.documents import Document
from colgrid_server.paths import DataDir
from tests.postgres_server import postgres_url  # noqa: F401
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    DOCS_PER_VERSION, INDEX, QUERIES, rollout_documents, tiny_checkpoint, tiny_encoder_dir)

POLL_SECONDS = 0.2
START_TIMEOUT_S = 120


class ServerProcess:
    """`python -m colgrid_server.cli serve` on a free port, its output in a log file."""

    def __init__(self, data_dir: Path, registry_url: str, replica_id: str, log: Path) -> None:
        self.replica_id = replica_id
        self.log = log
        env = {**os.environ, "COLGRID_REGISTRY_URL": registry_url, "COLGRID_REPLICA_ID": replica_id,
               "COLGRID_REGISTRY_POLL_SECONDS": str(POLL_SECONDS), "COLGRID_DEVICE": "cpu",
               "COLGRID_GRACE_SECONDS": "1", "COLGRID_WORKER_THREADS": "2"}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "colgrid_server.cli", "serve", "--data-dir", str(data_dir),
                 "--host", "127.0.0.1", "--port", "0"], env=env, stdout=out, stderr=subprocess.STDOUT)
        self.target = ""

    def wait_serving(self, deadline: float) -> str:
        while not (found := re.search(r"colgrid serving on (127\.0\.0\.1:\d+)", self.output())):
            assert self.process.poll() is None, f"{self.replica_id} exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"{self.replica_id} did not start:\n{self.output()}"
            time.sleep(0.1)
        self.target = found.group(1)
        return self.target

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


@contextmanager
def replicas(data_dir: Path, registry_url: str, *ids: str) -> Iterator[list[ServerProcess]]:
    """Start the servers together (their start-ups overlap) and stop them gracefully."""
    with ExitStack() as stack:
        servers = []
        for replica_id in ids:
            server = ServerProcess(data_dir, registry_url, replica_id, data_dir / f"{replica_id}.log")
            stack.callback(server.stop)
            servers.append(server)
        deadline = time.monotonic() + START_TIMEOUT_S
        for server in servers:
            server.wait_serving(deadline)
        yield servers
        exits = [server.stop() for server in servers]
        assert exits == [0] * len(servers), "\n".join(s.output() for s in servers)


def build_two_versions(data_dir: Path, registry_url: str, encoder: Path, documents: list[Document]) -> None:
    """v1 (stable, generation 1) and v2 (READY, not routed), built into the shared registry."""
    data = DataDir(data_dir)
    with open_registry(registry_url) as registry:
        for i, activate in enumerate((True, False)):
            build_index(data, registry, INDEX, documents[i * DOCS_PER_VERSION:(i + 1) * DOCS_PER_VERSION],
                        encoder_dir=encoder, activate=activate, progress=False)


def answering_versions(client: Client, n: int = 16) -> set[str]:
    return {client.search(INDEX, QUERIES[i % len(QUERIES)], k=3, routing_key=f"key-{i}").version
            for i in range(n)}


def acknowledgements(status) -> dict[str, tuple[bool, bool, int | None]]:
    return {r.replica_id: (r.live, r.acknowledged, r.generation) for r in status.replicas}


def test_two_servers_sharing_a_postgresql_registry_converge_on_each_rollout_change(
        postgres_url: str, tmp_path: Path, tiny_encoder_dir: Path, rollout_documents: list[Document]) -> None:
    data_dir = tmp_path / "data"
    build_two_versions(data_dir, postgres_url, tiny_encoder_dir, rollout_documents)
    with replicas(data_dir, postgres_url, "replica-a", "replica-b") as (a, b), \
            Client(a.target, timeout=60, retries=0) as via_a, Client(b.target, timeout=60, retries=0) as via_b:
        assert answering_versions(via_a) == answering_versions(via_b) == {"v1"}

        canary = via_a.start_canary(INDEX, "v2", 50, wait_for_replicas=30, actor="ops", reason="pg replicas")
        assert canary.rollout.generation == 2 and canary.pending_replicas == ()
        assert acknowledgements(canary) == {"replica-a": (True, True, 2), "replica-b": (True, True, 2)}
        assert answering_versions(via_b, 40) == {"v1", "v2"}

        # Through the other server: each one writes the same registry and waits for the other.
        promoted = via_b.promote(INDEX, wait_for_replicas=30, actor="ops")
        assert (promoted.rollout.stable, promoted.rollout.generation) == ("v2", 3)
        assert promoted.pending_replicas == () and promoted.replica_id == "replica-b"
        assert acknowledgements(promoted) == {"replica-a": (True, True, 3), "replica-b": (True, True, 3)}
        assert answering_versions(via_a) == answering_versions(via_b) == {"v2"}

        history = via_a.rollout_history(INDEX, limit=10)
    assert [e.action for e in history] == ["promote", "start_canary", "set_stable"]
    with open_registry(postgres_url) as registry:
        assert registry.list_replicas() == []  # both left the replica list when they stopped
