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
