"""The fault lab: one data dir that lives through every trial, a small real corpus, a tiny real
ONNX encoder, a `colgrid serve` child process, and the build timings kills are aimed with.

State accumulates on purpose: each trial starts from whatever the kills before it left behind
(BUILDING rows, temporary directories, stale replicas), as a real deployment would.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from colgrid_registry import Registry, VersionState, open_registry
from scripts._server import COLGRID, ServerProcess, colgrid_env, kill_now, start_server

INDEX = "docs"
QUERIES = ["parse a JSON document", "open a file for reading", "sort a list in place", "format a date",
           "compress data with zlib", "spawn a subprocess"]
SERVER_SETTINGS = {"COLGRID_REGISTRY_POLL_SECONDS": "0.2", "COLGRID_GRACE_SECONDS": "1",
                   "COLGRID_LOG_LEVEL": "WARNING"}
INITIAL_VERSIONS = 3  # READY versions before the first trial (v1 stable), so rollouts can move


@dataclass(frozen=True)
class LabConfig:
    work_dir: Path
    documents: int = 300        # corpus size: one build takes ~0.5 s of work after ~2 s of imports
    encoder_dir: Path | None = None  # an exported encoder to use; None: export a tiny random BERT
    seed: int = 0


@dataclass
class BuildTiming:
    """How long a build takes on this machine now: seconds from its start until its BUILDING
    row appears (imports, encoder load), and from then until its work ends. Aims use the median
    of the recent observations, so they follow the machine's load as it changes."""

    to_allocated: list[float]
    allocated_to_end: list[float]

    RECENT = 5

    @property
    def to_allocated_s(self) -> float:
        return statistics.median(self.to_allocated[-self.RECENT:])

    @property
    def allocated_to_end_s(self) -> float:
        return statistics.median(self.allocated_to_end[-self.RECENT:])

    def observe(self, *, to_allocated: float | None = None, allocated_to_end: float | None = None) -> None:
        if to_allocated is not None:
            self.to_allocated.append(to_allocated)
        if allocated_to_end is not None:
            self.allocated_to_end.append(allocated_to_end)


@dataclass
class Lab:
    config: LabConfig
    data_dir: Path
    encoder_dir: Path
    corpus: Path
    logs: Path
    registry: Registry                       # the harness's own handle, for polling during builds
    timing: BuildTiming | None = None         # of `colgrid index build`
    ingest_timing: BuildTiming | None = None  # of the Ingest RPC, when the server offers it
    server: ServerProcess | None = None
    once_building: set[str] = field(default_factory=set)  # seen BUILDING after their builder died
    server_starts: int = 0

    @property
    def registry_file(self) -> Path:
        return self.data_dir / "registry.db"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "indexes" / INDEX

    def versions(self) -> dict[str, VersionState]:
        return {v.version: v.state for v in self.registry.list_versions(INDEX)}

    def ready_versions(self) -> list[str]:
        return [name for name, state in self.versions().items() if state is VersionState.READY]

    def start_server(self) -> ServerProcess:
        if self.server is not None and self.server.alive():
            raise RuntimeError("a server is already running")
        self.server_starts += 1
        self.server = start_server(self.data_dir, self.logs / f"server-{self.server_starts}.log",
                                   settings=SERVER_SETTINGS)
        return self.server

    def live_server(self) -> ServerProcess:
        """The running server (restarted if a kill or a crash ended it)."""
        if self.server is None or not self.server.alive():
            self.start_server()
        return self.server

    def spawn_build(self, *, activate: bool, log: Path) -> subprocess.Popen:
        """`colgrid index build` of the corpus as a child process."""
        argv = [*COLGRID, "index", "build", INDEX, "--input", str(self.corpus), "--data-dir", str(self.data_dir),
                "--encoder", str(self.encoder_dir)] + ([] if activate else ["--no-activate"])
        with open(log, "wb") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=colgrid_env(),
                                    start_new_session=True)

    def wait_allocated(self, proc: subprocess.Popen, before: set[str], timeout_s: float = 120.0) -> float | None:
        """Poll until the build's BUILDING row appears; its time, or None if the process ended first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if set(self.versions()) - before:
                return time.monotonic()
            if proc.poll() is not None:
                return None
            time.sleep(0.005)
        kill_now(proc)
        raise TimeoutError(f"colgrid index build allocated no version within {timeout_s:.0f}s")

    def ingest(self, target: str, activate: bool, on_stage: Callable[[str], object] | None = None) -> str | None:
        """Stream the corpus to the server's Ingest RPC (`Client.ingest`); the version it built,
        or None when the stream failed (as it does when the server is killed)."""
        from colgrid_client import Client, ColgridError
        from colgrid_server.documents import read_jsonl

        documents = ({"id": d.id, "text": d.text} for d in read_jsonl(self.corpus))
        progress = None if on_stage is None else (lambda p: on_stage(p.stage))
        with Client(target, timeout=300, retries=0) as client:
            try:
                built = client.ingest(INDEX, documents, activate=activate, actor="fault-trials", on_progress=progress)
            except ColgridError:
                return None
        return built.version.version

    def time_ingest(self) -> BuildTiming:
        """Time one uninterrupted ingest (not activated), as `open_lab` times a build."""
        before = set(self.versions())
        result: list[str | None] = []
        began = time.monotonic()
        thread = threading.Thread(target=lambda: result.append(self.ingest(self.live_server().target, False)))
        thread.start()
        allocated = self.wait_allocated(self.server.proc, before)
        thread.join(300)
        ended = time.monotonic()
        if not result or result[0] is None or allocated is None:
            raise RuntimeError(f"the timing ingest failed; server log: {self.server.log_tail()}")
        self.ingest_timing = BuildTiming([allocated - began], [ended - allocated])
        return self.ingest_timing

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.registry.close()


def open_lab(config: LabConfig) -> Lab:
    """Prepare the data dir (encoder, corpus, v1 stable + v2, v3 READY), time one CLI build
    (v4, not activated) and start the server."""
    from colgrid_server.builder import build_index, import_encoder
    from colgrid_server.corpus import iter_docstring_documents, write_jsonl
    from colgrid_server.paths import DataDir

    work = config.work_dir
    work.mkdir(parents=True, exist_ok=True)
    data = DataDir(work / "data")
    if data.root.exists():
        shutil.rmtree(data.root)
    encoder_dir = config.encoder_dir or _export_tiny_encoder(work / "encoder")
    documents = list(iter_docstring_documents(limit=config.documents))
    corpus = work / "corpus.jsonl"
    write_jsonl(documents, corpus)
    data.root.mkdir(parents=True)
    encoder_dir = import_encoder(data, encoder_dir)
    registry = open_registry(data.registry_file)
    lab = Lab(config, data.root, encoder_dir, corpus, work / "logs", registry)
    lab.logs.mkdir(exist_ok=True)
    for i in range(INITIAL_VERSIONS):
        build_index(data, registry, INDEX, documents, encoder_dir=encoder_dir, activate=i == 0,
                    progress=False, reason="fault lab setup")
    lab.timing = _time_build(lab)
    lab.start_server()
    return lab


def _time_build(lab: Lab) -> BuildTiming:
    before = set(lab.versions())
    began = time.monotonic()
    proc = lab.spawn_build(activate=False, log=lab.logs / "build-timing.log")
    allocated = lab.wait_allocated(proc, before)
    status = proc.wait(300)
    ended = time.monotonic()
    if status != 0 or allocated is None:
        raise RuntimeError(f"the timing build failed (status {status}): "
                           f"{(lab.logs / 'build-timing.log').read_text(errors='replace')[-2000:]}")
    return BuildTiming([allocated - began], [ended - allocated])


def _export_tiny_encoder(out: Path) -> Path:
    """A randomly initialised (seeded) 1-layer BERT, hidden size 32, with MiniLM's tokenizer,
    exported like any checkpoint: real ONNX, encodes a document in well under a millisecond."""
    import torch
    from transformers import BertConfig, BertModel

    from colgrid_server.encoders import bundled_checkpoint, export_text_encoder

    checkpoint = out.parent / "tiny-bert-checkpoint"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_checkpoint() / name, checkpoint / name)
    if out.exists():
        shutil.rmtree(out)
    export_text_encoder(checkpoint, out, name="tiny-bert", progress=False)
    return out
