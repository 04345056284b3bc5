"""Versions on a live server: corrupt versions are never served, new versions go live whole."""
from __future__ import annotations

from pathlib import Path

import pytest

from colgrid_client import Client, FailedPreconditionError
from colgrid_registry import open_registry
from colgrid_server.builder import build_index
from colgrid_server.paths import DataDir
from tests.conftest import link_encoders, start_live_server, stop_live_server


def flip_one_byte(version_dir: Path) -> Path:
    """Flip a byte in the largest data file of a published version (a token chunk)."""
    files = [p for p in version_dir.rglob("*") if p.is_file() and p.name != "manifest.json"]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return victim


@pytest.fixture()
def two_index_dir(tmp_path, shared_data_dir, encoder_dir, stdlib_documents) -> Path:
    link_encoders(tmp_path, shared_data_dir)
    with open_registry(DataDir(tmp_path).registry_file) as registry:
        build_index(DataDir(tmp_path), registry, "good", stdlib_documents[:60], progress=False)
        build_index(DataDir(tmp_path), registry, "fragile", stdlib_documents[60:120], progress=False)
    return tmp_path


def test_corrupt_version_is_refused_and_other_indexes_keep_serving(two_index_dir):
    with open_registry(DataDir(two_index_dir).registry_file) as registry:
        fragile = registry.get_version("fragile", registry.get_rollout("fragile").stable)
    flip_one_byte(Path(fragile.storage_uri))

    server, thread = start_live_server(two_index_dir)
    try:
        with Client(server.target, timeout=60, retries=0) as client:
            assert client.search("good", "open a file", k=3).hits
            with pytest.raises(FailedPreconditionError) as info:
                client.search("fragile", "open a file", k=3)
            message = str(info.value)
            assert fragile.version in message and "fragile" in message
            assert client.search("good", "sort a list", k=3).hits
    finally:
        stop_live_server(server, thread)


def test_a_new_version_goes_live_and_a_corrupt_one_leaves_the_old_serving(two_index_dir, stdlib_documents):
    data = DataDir(two_index_dir)
    server, thread = start_live_server(two_index_dir)
    try:
        with Client(server.target, timeout=60, retries=0) as client, open_registry(data.registry_file) as registry:
            first = client.search("good", "open a file", k=3).version

            second = build_index(data, registry, "good", stdlib_documents[200:260], progress=False).version
            server.refresh()
            after = client.search("good", stdlib_documents[210].text[:200], k=3)
            assert (first, after.version) == ("v1", second) and second == "v2"
            assert after.hits[0].doc_id == stdlib_documents[210].id

            third = build_index(data, registry, "good", stdlib_documents[300:330], progress=False)
            flip_one_byte(Path(registry.get_version("good", third.version).storage_uri))
            assert server.refresh() is False
            still = client.search("good", "open a file", k=3)
            assert still.version == second
    finally:
        stop_live_server(server, thread)
