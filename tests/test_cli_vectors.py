"""`colgrid index build NAME --vectors PATH`: a version from precomputed multi-vectors, served
and searched with query vectors; text search on it is refused with FAILED_PRECONDITION."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from colgrid_client import Client, FailedPreconditionError
from colgrid_registry import VersionState, open_registry
from colgrid_server.paths import DataDir
from tests.conftest import start_live_server, stop_live_server
from tests.test_cli import colgrid

DIM = 48


def _write_vectors(directory: Path, n_docs: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, size=n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.normal(size=(int(offsets[-1]), DIM)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    directory.mkdir(parents=True)
    np.save(directory / "tokens.npy", tokens)
    np.save(directory / "doc_offsets.npy", offsets)
    (directory / "doc_ids.json").write_text(json.dumps([f"vec-{i}" for i in range(n_docs)]))
    return tokens, offsets


def test_a_version_from_vector_files_is_served_and_searched_by_query_vectors(tmp_path: Path) -> None:
    tokens, offsets = _write_vectors(tmp_path / "vectors")
    proc = colgrid("index", "build", "byo", "--vectors", str(tmp_path / "vectors"), "--n-centroids", "32",
                   "--data-dir", str(tmp_path / "data"))
    assert "120 documents" in proc.stdout and "external vectors (dim 48)" in proc.stdout
    with open_registry(DataDir(tmp_path / "data").registry_file) as registry:
        (version,) = registry.list_versions("byo")
        assert version.state is VersionState.READY and version.encoder_kind == "external" and version.dim == DIM
    server, thread = start_live_server(tmp_path / "data")
    try:
        with Client(server.target, timeout=60, retries=0) as client:
            doc = 17
            query = tokens[offsets[doc]:offsets[doc + 1]]
            hits = client.search("byo", query_vectors=query, k=3).hits
            assert hits[0].doc_id == f"vec-{doc}"
            with pytest.raises(FailedPreconditionError, match="query_vectors"):
                client.search("byo", "any text at all")
    finally:
        stop_live_server(server, thread)


def test_vectors_that_are_not_unit_length_need_not_normalized(tmp_path: Path) -> None:
    tokens, offsets = _write_vectors(tmp_path / "vectors")
    np.save(tmp_path / "vectors" / "tokens.npy", tokens * 3.0)
    refused = colgrid("index", "build", "byo", "--vectors", str(tmp_path / "vectors"), "--data-dir",
                      str(tmp_path / "data"), check=False)
    assert refused.returncode == 1 and "norm" in refused.stderr
    accepted = colgrid("index", "build", "byo", "--vectors", str(tmp_path / "vectors"), "--not-normalized",
                       "--n-centroids", "32", "--data-dir", str(tmp_path / "data"))
    assert "READY" in accepted.stdout


def test_build_needs_inputs_or_vectors(tmp_path: Path) -> None:
    proc = colgrid("index", "build", "nothing", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "--vectors" in proc.stderr
