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


# pytest runs a session fixture once per module that imports it; these fixtures are shared by
# several modules, so they keep their value here, once per test session.
_SESSION: dict[tuple[int, str], object] = {}


def _once(factory: pytest.TempPathFactory, key: str, make):
    slot = (id(factory), key)
    if slot not in _SESSION:
        _SESSION[slot] = make()
    return _SESSION[slot]


@pytest.fixture(scope="session")
def rollout_documents(tmp_path_factory: pytest.TempPathFactory) -> list[Document]:
    from colgrid_server.corpus import iter_docstring_documents

    return _once(tmp_path_factory, "documents", lambda: list(iter_docstring_documents(limit=8 * DOCS_PER_VERSION)))


def make_tiny_checkpoint(path: Path, hidden: int = 32) -> Path:
    """Save a randomly initialised (seeded) 1-layer BERT with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from colgrid_server.encoders import bundled_checkpoint

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * hidden)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundled_checkpoint() / name, path / name)
    return path


def export_tiny_encoder(checkpoint: Path, out: Path, **options) -> Path:
    from colgrid_server.encoders import export_text_encoder

    export_text_encoder(checkpoint, out, name=out.name, progress=False, **options)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _once(tmp_path_factory, "checkpoint",
                 lambda: make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert-checkpoint")))


def _export(factory: pytest.TempPathFactory, checkpoint: Path, name: str, **options) -> Path:
    return _once(factory, name, lambda: export_tiny_encoder(checkpoint, factory.mktemp("tiny-encoders") / name,
                                                            **options))


@pytest.fixture(scope="session")
def tiny_encoder_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ONNX text encoder small enough to export in well under a second (dim 32)."""
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-bert")


@pytest.fixture(scope="session")
def other_tiny_encoder_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another encoder (its own identity): the same weights, queries cut at 8 tokens."""
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-bert-short", query_max_length=8)


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


@pytest.fixture(scope="session")
def narrow_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third encoder, of another dimension (16): its versions cannot take 32-dim query vectors."""
    def make() -> Path:
        checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("narrow-bert-checkpoint"), hidden=16)
        return export_tiny_encoder(checkpoint, tmp_path_factory.mktemp("tiny-encoders") / "narrow-bert")

    return _once(tmp_path_factory, "narrow-bert", make)


@pytest.fixture(scope="session")
def version_template(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path,
                     rollout_documents: list[Document]) -> Path:
    """v1 (stable), v2, v3 of `docs`, built once: tests get a registry copy pointing at them."""
    def make() -> Path:
        root = tmp_path_factory.mktemp("rollout-template")
        assert build_versions(root, tiny_encoder_dir, rollout_documents, 3) == ["v1", "v2", "v3"]
        return root

    return _once(tmp_path_factory, "template", make)


@pytest.fixture()
def three_versions(tmp_path: Path, version_template: Path) -> Path:
    """A data dir whose index `docs` has v1 (stable), v2 and v3 READY, each on other documents
    (40 each: documents 0-39, 40-79, 80-119). Its registry is its own; the version files are
    shared with other tests, so a test that damages files builds its own version first."""
    template = DataDir(version_template)
    data = DataDir(tmp_path)
    for suffix in ("", "-wal", "-shm"):
        source = template.registry_file.with_name(template.registry_file.name + suffix)
        if source.exists():
            shutil.copy2(source, data.registry_file.with_name(source.name))
    data.encoders.mkdir(parents=True)
    for encoder in template.encoders.iterdir():
        (data.encoders / encoder.name).symlink_to(encoder.resolve(), target_is_directory=True)
    return tmp_path


def run_in_threads(count: int, target, *args) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, args=(i, *args), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads
