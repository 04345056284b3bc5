"""Harness shared by the tests/test_rollout_*.py files (pytest collects no tests from here).

Rollout tests need several real versions per index and many requests, so they use a tiny real
encoder: a randomly initialised 1-layer BERT (hidden size 32) exported to ONNX the same way as
MiniLM (export + parity check, ~0.3 s). Its query encoding takes well under a millisecond, so
thousands of real searches fit in seconds. Versions are built from real stdlib docstrings.
"""
from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from colgrid_client import Client
from colgrid_registry import Registry, open_registry
from colgrid_server.builder import build_index
from colgrid_server.documents import Document
from colgrid_server.paths import DataDir
from tests.conftest import LiveServer, start_live_server, stop_live_server

INDEX = "docs"
DOCS_PER_VERSION = 40
QUERIES = ["parse a JSON document", "open a file for reading", "sort a list in place", "format a date",
           "compress data with zlib", "spawn a subprocess", "read environment variables", "hash a password"]


@pytest.fixture(scope="session")
def rollout_documents() -> list[Document]:
    from colgrid_server.corpus import iter_docstring_documents

    return list(iter_docstring_documents(limit=8 * DOCS_PER_VERSION))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX text encoder small enough to export in well under a second (dim 32)."""
    import torch
    from transformers import BertConfig, BertModel

    from colgrid_server.encoders import bundled_checkpoint, export_text_encoder

    checkpoint = tmp_path_factory.mktemp("tiny-bert-checkpoint")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(checkpoint)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_checkpoint() / name, checkpoint / name)
    out = tmp_path_factory.mktemp("tiny-encoders") / "tiny-bert"
    export_text_encoder(checkpoint, out, name="tiny-bert", progress=False)
    return out


def build_versions(data_dir: Path, encoder: Path, documents: Sequence[Document], count: int, *,
                   index: str = INDEX, per_version: int = DOCS_PER_VERSION, first: int = 0) -> list[str]:
    """Build `count` versions of `index` from consecutive document slices; the first one built
    becomes stable if the index has none."""
    data = DataDir(data_dir)
    names = []
    with open_registry(data.registry_file) as registry:
        for i in range(first, first + count):
            activate = registry.get_rollout(index).stable is None if _exists(registry, index) else True
            outcome = build_index(data, registry, index, documents[i * per_version:(i + 1) * per_version],
                                  encoder_dir=encoder, activate=activate, progress=False)
            names.append(outcome.version)
    return names


def _exists(registry: Registry, index: str) -> bool:
    return any(r.name == index for r in registry.list_indexes())


@dataclass
class Served:
    """A live server on a data dir, with a client and a registry handle on the same data."""

    server: LiveServer
    client: Client
    registry: Registry

    @property
    def target(self) -> str:
        return self.server.target

    @property
    def state(self):  # colgrid_server.serving.ServingState
        return self.server.running.state


@contextmanager
def serving(data_dir: Path, **overrides) -> Iterator[Served]:
    server, thread = start_live_server(data_dir, **overrides)
    registry = open_registry(DataDir(data_dir).registry_file)
    client = Client(server.target, timeout=60, retries=0)
    try:
        yield Served(server, client, registry)
    finally:
        client.close()
        registry.close()
        stop_live_server(server, thread)


@pytest.fixture()
def three_versions(tmp_path: Path, tiny_encoder_dir: Path, rollout_documents: list[Document]) -> Path:
    """A data dir whose index `docs` has v1 (stable), v2 and v3 READY, each on other documents."""
    assert build_versions(tmp_path, tiny_encoder_dir, rollout_documents, 3) == ["v1", "v2", "v3"]
    return tmp_path


def run_in_threads(count: int, target, *args) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(i, *args), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads
