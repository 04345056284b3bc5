"""Shared fixtures: real encoder exported once per session, real indexes built from real text.

Contracts the fixtures rely on (keep them stable):
- colgrid_server.encoders.ensure_default_encoder(data_dir) -> Path  (exports bundled MiniLM)
- colgrid_server.encoders.load_encoder(path) -> TextEncoder
- colgrid_server.corpus.iter_docstring_documents(limit=...) -> Iterator[Document]
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir shared by session fixtures (encoders live here once exported)."""
    return tmp_path_factory.mktemp("colgrid-data")


@pytest.fixture(scope="session")
def encoder_dir(shared_data_dir: Path) -> Path:
    from colgrid_server.encoders import ensure_default_encoder

    return ensure_default_encoder(shared_data_dir)


@pytest.fixture(scope="session")
def text_encoder(encoder_dir: Path):
    from colgrid_server.encoders import load_encoder

    return load_encoder(encoder_dir)


# ------------------------------------------------------------------------------------ servers

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class LiveServer:
    """A real colgrid gRPC server on 127.0.0.1:<free port>, running its own event loop."""

    target: str
    port: int
    data_dir: Path
    running: object  # colgrid_server.service.app.RunningServer
    loop: asyncio.AbstractEventLoop

    def refresh(self) -> bool:
        return asyncio.run_coroutine_threadsafe(self.running.refresh(), self.loop).result(120)


def start_live_server(data_dir: Path, **overrides) -> tuple[LiveServer, threading.Thread]:
    from colgrid_server.config import Settings
    from colgrid_server.service.app import start_server

    settings = Settings.load({"data_dir": data_dir, "host": "127.0.0.1", "port": 0,
                              "registry_poll_seconds": 3600.0, **overrides}, environ={})
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["running"] = loop.run_until_complete(start_server(settings))
        except BaseException as exc:  # surface start failures in the test thread
            started["error"] = exc
        ready.set()
        if "running" in started:
            loop.run_forever()

    thread = threading.Thread(target=run, name="colgrid-test-server", daemon=True)
    thread.start()
    ready.wait(300)
    if "error" in started:
        raise started["error"]
    running = started["running"]
    return LiveServer(target=f"127.0.0.1:{running.port}", port=running.port, data_dir=data_dir,
                      running=running, loop=loop), thread


def stop_live_server(server: LiveServer, thread: threading.Thread) -> None:
    asyncio.run_coroutine_threadsafe(server.running.stop(grace=1.0), server.loop).result(60)
    server.loop.call_soon_threadsafe(server.loop.stop)
    thread.join(30)


def link_encoders(data_dir: Path, shared: Path) -> None:
    """Let a test data dir use the session's exported encoder without copying 90 MB."""
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "encoders"
    if not link.exists():
        link.symlink_to(shared / "encoders", target_is_directory=True)


@pytest.fixture(scope="session")
def stdlib_documents() -> list:
    from colgrid_server.corpus import iter_docstring_documents

    return list(iter_docstring_documents(limit=6000, include_private=True))


@pytest.fixture(scope="session")
def served_data_dir(tmp_path_factory, shared_data_dir, encoder_dir, stdlib_documents) -> Path:
    """A data dir whose registry serves `docs` (400 real stdlib docstrings) at its stable version."""
    from colgrid_registry import open_registry
    from colgrid_server.builder import build_index
    from colgrid_server.paths import DataDir

    data_dir = tmp_path_factory.mktemp("served")
    link_encoders(data_dir, shared_data_dir)
    with open_registry(DataDir(data_dir).registry_file) as registry:
        build_index(DataDir(data_dir), registry, "docs", stdlib_documents[:400], progress=False)
        registry.ensure_index("empty")  # an index with no version yet
    return data_dir


@pytest.fixture(scope="session")
def live_server(served_data_dir: Path) -> Iterator[LiveServer]:
    server, thread = start_live_server(served_data_dir)
    yield server
    stop_live_server(server, thread)


@pytest.fixture()
def client(live_server: LiveServer):
    from colgrid_client import Client

    with Client(live_server.target, timeout=60, retries=0) as c:
        yield c


# ------------------------------------------------------------------------------- multimodal

@pytest.fixture(scope="session")
def colqwen2_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ColQwen2, built offline and exported to ONNX once per session."""
    from colgrid_server.encoders import export_colqwen2
    from colgrid_server.encoders.tiny_models import build_tiny_colqwen2

    root = tmp_path_factory.mktemp("tiny-colqwen2")
    checkpoint = build_tiny_colqwen2(root / "ckpt", seed=0)
    return export_colqwen2(checkpoint, root / "encoder", progress=False).path


@pytest.fixture(scope="session")
def mixed_sources_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real inputs generated here: a 3-page PDF (text, a table, a line chart), a PNG chart,
    a JPEG photo-like image and two text files."""
    from tests.documents_gen import write_mixed_sources

    return write_mixed_sources(tmp_path_factory.mktemp("sources"))
