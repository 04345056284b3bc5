"""Index versions on S3-compatible object storage, against a real S3 server (moto in server
mode on 127.0.0.1): publish with the manifest last, fetch into a verified local cache, builds
and servers with COLGRID_STORAGE_URL, and interrupted builds that never become READY."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from colgrid_registry import VersionState, open_registry
from colgrid_server.builder import build_index
from colgrid_server.errors import CorruptVersion, FailedPrecondition, NotFound
from colgrid_server.index import MANIFEST_NAME, build_version_from_arrays, open_version
from colgrid_server.index._manifest import read_manifest
from colgrid_server.paths import DataDir
from colgrid_server.storage import (
    LocalStorage, ObjectStorage, StorageUnavailable, VersionStorage, is_remote_uri, open_stored)
from tests.conftest import link_encoders, start_live_server, stop_live_server

INDEX = "docs"
QUERIES = ("parse a JSON document", "open a socket connection", "sort a list in place")
BUILD_PARAMS = {"n_centroids": 32}


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint; botocore (s3fs) finds it through the standard AWS_* variables."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                            ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(name, value)
        yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server: str):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def new_bucket(s3) -> str:
    """s3://<a fresh bucket>/colgrid: every test publishes into its own bucket."""
    bucket = f"colgrid-{uuid.uuid4().hex[:12]}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/colgrid"


@pytest.fixture()
def url(s3) -> str:
    return new_bucket(s3)


@pytest.fixture(scope="session")
def tiny_version(tmp_path_factory) -> Path:
    """A small real version (60 documents of random unit vectors), built once."""
    rng = np.random.default_rng(7)
    lengths = rng.integers(5, 30, size=60)
    tokens = rng.standard_normal((int(lengths.sum()), 32)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("tiny") / "v1"
    build_version_from_arrays(path, tokens=tokens, doc_offsets=np.concatenate([[0], np.cumsum(lengths)]),
                              doc_ids=[f"doc-{i}" for i in range(60)], normalized=True,
                              build_params={"n_centroids": 16})
    return path


class RecordingFS:
    """A real S3 filesystem that records the uploads and downloads made through it, and can
    fail (raise) or stall after a number of uploads, as a network or a dying process would."""

    def __init__(self, fs, *, fail_after: int | None = None, failing: str = "") -> None:
        """fail_after counts (and fails) only uploads whose key contains `failing`."""
        self._fs = fs
        self.fail_after = fail_after
        self.failing = failing
        self.puts: list[str] = []
        self.gets: list[str] = []
        self._lock = threading.Lock()

    def put_file(self, lpath, rpath, **kwargs):
        with self._lock:
            counted = [p for p in self.puts if self.failing in p]
            if self.fail_after is not None and self.failing in rpath and len(counted) >= self.fail_after:
                raise ConnectionResetError("connection reset by peer (injected)")
            self.puts.append(rpath)
        return self._fs.put_file(lpath, rpath, **kwargs)

    def get_file(self, rpath, lpath, **kwargs):
        with self._lock:
            self.gets.append(rpath)
        return self._fs.get_file(rpath, lpath, **kwargs)

    def __getattr__(self, name):
        return getattr(self._fs, name)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def flip_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def biggest_file(version_dir: Path) -> str:
    files, _ = read_manifest(version_dir)
    return max(files, key=lambda rel: files[rel]["size"])


# ------------------------------------------------------ the contract, for every backend

@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> VersionStorage:
    if request.param == "local":
        return LocalStorage(tmp_path / "data")
    return ObjectStorage(new_bucket(request.getfixturevalue("s3")), tmp_path / "cache")


def test_a_published_version_fetches_complete_and_verifies(storage, tiny_version):
    uri = storage.publish(tiny_version, INDEX, "v1")
    assert uri == storage.uri_for(INDEX, "v1") and is_remote_uri(uri) == storage.remote
    assert files_of(storage.fetch(uri)) == files_of(tiny_version)
    assert storage.verify(uri) == read_manifest(tiny_version)[1]
    assert storage.has_files(uri)


def test_a_published_version_cannot_be_published_again(storage, tiny_version):
    storage.publish(tiny_version, INDEX, "v1")
    with pytest.raises(FailedPrecondition, match="immutable"):
        storage.publish(tiny_version, INDEX, "v1")


def test_a_directory_without_a_manifest_is_never_published(storage, tiny_version, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "zarr.json").write_bytes((tiny_version / "zarr.json").read_bytes())
    with pytest.raises(FailedPrecondition, match="manifest"):
        storage.publish(unfinished, INDEX, "v1")
    assert not storage.has_files(storage.uri_for(INDEX, "v1"))


def test_a_deleted_version_is_gone_from_the_store(storage, tiny_version):
    uri = storage.publish(tiny_version, INDEX, "v1")
    storage.delete(uri)
    assert not storage.has_files(uri)
    with pytest.raises(NotFound):
        storage.verify(uri)


# -------------------------------------------------------------------------- object storage

def test_publish_uploads_the_manifest_last(s3, url, tiny_version, tmp_path):
    recording = RecordingFS(s3)
    ObjectStorage(url, tmp_path / "cache", filesystem=recording).publish(tiny_version, INDEX, "v1")
    assert recording.puts[-1].endswith(f"/{INDEX}/v1/{MANIFEST_NAME}")
    assert len(recording.puts) == len(files_of(tiny_version))


def test_a_fetched_version_opens_from_the_cache_and_is_not_downloaded_again(s3, url, tiny_version, tmp_path):
    uri = ObjectStorage(url, tmp_path / "publisher").publish(tiny_version, INDEX, "v1")
    recording = RecordingFS(s3)
    reader = ObjectStorage(url, tmp_path / "cache", filesystem=recording)
    path = reader.fetch(uri)
    assert path.is_relative_to(tmp_path / "cache") and path.name == "v1"
    assert open_version(path).doc_ids == open_version(tiny_version).doc_ids
    downloads = len(recording.gets)
    assert reader.fetch(uri) == path
    assert len(recording.gets) == downloads == len(files_of(tiny_version)) - 1  # the manifest is read, not copied


def test_concurrent_fetches_of_one_version_download_it_once(s3, url, tiny_version, tmp_path):
    uri = ObjectStorage(url, tmp_path / "publisher").publish(tiny_version, INDEX, "v1")
    recording = RecordingFS(s3)
    reader = ObjectStorage(url, tmp_path / "cache", filesystem=recording)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(reader.fetch(uri))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(paths) == 4 and len(set(paths)) == 1
    assert len(recording.gets) == len(files_of(tiny_version)) - 1
    assert files_of(paths[0]) == files_of(tiny_version)


def test_a_truncated_cached_file_is_detected_and_fetched_again(url, tiny_version, tmp_path):
    storage = ObjectStorage(url, tmp_path / "cache")
    path = storage.fetch(storage.publish(tiny_version, INDEX, "v1"))
    victim = path / biggest_file(path)
    victim.write_bytes(victim.read_bytes()[:-10])
    assert storage.fetch(storage.uri_for(INDEX, "v1")) == path
    assert files_of(path) == files_of(tiny_version)


def test_a_flipped_byte_in_the_cache_is_caught_when_opened_and_fetched_again(url, tiny_version, tmp_path):
    storage = ObjectStorage(url, tmp_path / "cache")
    uri = storage.publish(tiny_version, INDEX, "v1")
    path = storage.fetch(uri)
    victim = path / biggest_file(path)
    victim.write_bytes(flip_byte(victim.read_bytes()))  # same size: only the sha256 can tell
    loaded = open_stored(storage, uri, manifest_sha256=read_manifest(tiny_version)[1])
    assert loaded.documents == 60
    assert files_of(path) == files_of(tiny_version)


def test_a_corrupt_object_is_refused_at_fetch_and_nothing_is_cached(s3, url, tiny_version, tmp_path):
    uri = ObjectStorage(url, tmp_path / "publisher").publish(tiny_version, INDEX, "v1")
    key = f"{uri.removeprefix('s3://')}/{biggest_file(tiny_version)}"
    s3.pipe_file(key, flip_byte(s3.cat_file(key)))
    reader = ObjectStorage(url, tmp_path / "cache")
    with pytest.raises(CorruptVersion, match="sha256"):
        reader.fetch(uri)
    with pytest.raises(CorruptVersion, match="sha256"):
        reader.verify(uri)
    assert not reader.build_dir(INDEX, "v1").exists()


def test_a_cached_copy_with_another_manifest_than_the_registry_recorded_is_refused(url, tiny_version, tmp_path):
    storage = ObjectStorage(url, tmp_path / "cache")
    uri = storage.publish(tiny_version, INDEX, "v1")
    with pytest.raises(CorruptVersion, match="not the one the registry recorded"):
        storage.fetch(uri, manifest_sha256="0" * 64)


def test_an_upload_failing_half_way_publishes_nothing(s3, url, tiny_version, tmp_path):
    failing = RecordingFS(s3, fail_after=3)
    storage = ObjectStorage(url, tmp_path / "cache", filesystem=failing, transfer_threads=1)
    with pytest.raises(StorageUnavailable, match="injected"):
        storage.publish(tiny_version, INDEX, "v1")
    assert len(failing.puts) == 3 and not any(p.endswith(MANIFEST_NAME) for p in failing.puts)
    assert not storage.has_files(storage.uri_for(INDEX, "v1"))  # the partial upload was removed


def test_a_missing_bucket_is_reported_as_unavailable_storage(s3_server, tmp_path):
    storage = ObjectStorage("s3://no-such-bucket-colgrid/x", tmp_path / "cache")
    with pytest.raises(StorageUnavailable, match="does not exist"):
        storage.fetch(storage.uri_for(INDEX, "v1"))


def test_settings_choose_the_storage_and_its_cache(s3_server, tmp_path):
    from colgrid_server.config import Settings
    from colgrid_server.storage import storage_for

    assert isinstance(storage_for(Settings(data_dir=tmp_path)), LocalStorage)
    remote = storage_for(Settings(data_dir=tmp_path, storage_url="s3://bucket/prefix/"))
    assert isinstance(remote, ObjectStorage) and remote.cache.root == (tmp_path / "cache").resolve()
    assert remote.uri_for(INDEX, "v3") == "s3://bucket/prefix/indexes/docs/v3"
    chosen = storage_for(Settings(data_dir=tmp_path, storage_url="s3://bucket", storage_cache_dir=str(tmp_path / "c")))
    assert chosen.build_dir(INDEX, "v1") == (tmp_path / "c" / "s3" / "bucket" / "indexes" / INDEX / "v1").resolve()


def test_a_storage_url_that_is_not_object_storage_is_refused_naming_the_setting(tmp_path):
    from colgrid_server.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        ObjectStorage("/srv/indexes", tmp_path / "cache")
    assert info.value.field == "storage_url"


def test_a_server_without_object_storage_names_the_setting_for_an_s3_version():
    with pytest.raises(FailedPrecondition, match="COLGRID_STORAGE_URL"):
        LocalStorage().fetch("s3://bucket/colgrid/indexes/docs/v1")


# ------------------------------------------------------------- builds and servers on S3

class Built:
    def __init__(self, data_dir: Path, url: str, version: str) -> None:
        self.data_dir, self.url, self.version = data_dir, url, version

    @property
    def registry_file(self) -> Path:
        return DataDir(self.data_dir).registry_file


@pytest.fixture(scope="module")
def built(tmp_path_factory, s3, shared_data_dir, encoder_dir, stdlib_documents) -> Built:
    """`docs` built with a storage_url: v1 published to S3 and stable."""
    url = new_bucket(s3)
    data_dir = tmp_path_factory.mktemp("s3-built")
    link_encoders(data_dir, shared_data_dir)
    with open_registry(DataDir(data_dir).registry_file) as registry:
        outcome = build_index(DataDir(data_dir), registry, INDEX, stdlib_documents[:100], progress=False,
                              build_params=BUILD_PARAMS, storage=ObjectStorage(url, data_dir / "cache"))
    return Built(data_dir, url, outcome.version)


@pytest.fixture(scope="module")
def first_server(built):
    server, thread = start_live_server(built.data_dir, storage_url=built.url)
    yield server
    stop_live_server(server, thread)


def answers(target: str) -> list[tuple[str, list[tuple[str, float]]]]:
    from colgrid_client import Client

    with Client(target, timeout=60, retries=0) as client:
        results = [client.search(INDEX, query, k=5) for query in QUERIES]
    return [(r.version, [(h.doc_id, round(h.score, 4)) for h in r.hits]) for r in results]


def replica_of(built: Built, data_dir: Path, shared_data_dir: Path, **overrides):
    """Another server: its own data dir and (empty) cache, the same registry and bucket."""
    link_encoders(data_dir, shared_data_dir)
    return start_live_server(data_dir, registry_url=str(built.registry_file), storage_url=built.url, **overrides)


def test_a_build_with_a_storage_url_is_ready_at_its_s3_uri_with_the_manifest_uploaded(built, s3):
    with open_registry(built.registry_file) as registry:
        record = registry.get_version(INDEX, built.version)
        assert registry.get_rollout(INDEX).stable == built.version
    assert record.state is VersionState.READY
    assert record.storage_uri == f"{built.url}/indexes/{INDEX}/{built.version}"
    assert s3.exists(f"{record.storage_uri.removeprefix('s3://')}/{MANIFEST_NAME}")
    checker = ObjectStorage(built.url, built.data_dir / "verify-cache")
    assert checker.verify(record.storage_uri) == record.manifest_sha256
    assert not DataDir(built.data_dir).indexes.exists()  # nothing published under the data dir


def test_a_server_with_a_storage_url_serves_the_version_from_its_local_cache(built, first_server):
    result = answers(first_server.target)
    assert {version for version, _ in result} == {built.version} and all(hits for _, hits in result)
    served = first_server.running.state.snapshot()[INDEX].stable
    assert served.loaded.path.is_relative_to(built.data_dir / "cache")


def test_a_second_server_with_an_empty_cache_fetches_the_version_and_answers_the_same(
        built, first_server, tmp_path, shared_data_dir):
    server, thread = replica_of(built, tmp_path / "replica", shared_data_dir)
    try:
        assert answers(server.target) == answers(first_server.target)
        served = server.running.state.snapshot()[INDEX].stable
        assert served.loaded.path.is_relative_to(tmp_path / "replica" / "cache")
    finally:
        stop_live_server(server, thread)


def test_a_corrupt_object_on_storage_fails_the_load_on_its_checksum_and_stable_keeps_serving(
        built, s3, tmp_path, shared_data_dir, stdlib_documents):
    from colgrid_client import Client, FailedPreconditionError

    with open_registry(built.registry_file) as registry:
        outcome = build_index(DataDir(built.data_dir), registry, INDEX, stdlib_documents[100:130], progress=False,
                              build_params={"n_centroids": 8}, activate=False,
                              storage=ObjectStorage(built.url, tmp_path / "builder-cache"))
        uri = registry.get_version(INDEX, outcome.version).storage_uri
    key = f"{uri.removeprefix('s3://')}/{biggest_file(tmp_path / 'builder-cache' / 's3' / uri.removeprefix('s3://'))}"
    s3.pipe_file(key, flip_byte(s3.cat_file(key)))
    server, thread = replica_of(built, tmp_path / "replica", shared_data_dir)
    try:
        with Client(server.target, timeout=60, retries=0) as client:
            with pytest.raises(FailedPreconditionError) as info:
                client.set_stable(INDEX, outcome.version)
            assert info.value.error_metadata["check"] == "checksum"
            assert "sha256" in str(info.value)
            assert client.get_rollout(INDEX).rollout.stable == built.version
            assert client.search(INDEX, QUERIES[0], k=3).version == built.version
    finally:
        stop_live_server(server, thread)


def test_colgrid_index_verify_checks_versions_on_object_storage(built, monkeypatch, capsys):
    from colgrid_server.cli import main

    monkeypatch.setenv("COLGRID_STORAGE_URL", built.url)
    monkeypatch.setenv("COLGRID_STORAGE_CACHE_DIR", str(built.data_dir / "cli-cache"))
    assert main(["index", "verify", INDEX, built.version, "--data-dir", str(built.data_dir)]) == 0
    assert f"{INDEX}/{built.version}: ok ({built.url}/indexes/{INDEX}/{built.version})" in capsys.readouterr().out


# ----------------------------------------------------------------- interrupted builds

def test_a_build_failing_mid_publish_is_failed_and_leaves_no_manifest_on_storage(
        s3, url, tmp_path, shared_data_dir, encoder_dir, stdlib_documents):
    link_encoders(tmp_path, shared_data_dir)
    storage = ObjectStorage(url, tmp_path / "cache", filesystem=RecordingFS(s3, fail_after=3, failing="/indexes/"))
    with open_registry(DataDir(tmp_path).registry_file) as registry:
        with pytest.raises(StorageUnavailable, match="injected"):
            build_index(DataDir(tmp_path), registry, INDEX, stdlib_documents[:20], progress=False,
                        build_params={"n_centroids": 8}, storage=storage)
        (record,) = registry.list_versions(INDEX)
        assert record.state is VersionState.FAILED and "injected" in record.error
        assert registry.get_rollout(INDEX).stable is None
    uri = storage.uri_for(INDEX, record.version)
    assert not s3.exists(f"{uri.removeprefix('s3://')}/{MANIFEST_NAME}")
    assert not storage.has_files(uri) and not storage.build_dir(INDEX, record.version).exists()


KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import fsspec
    from colgrid_registry import open_registry
    from colgrid_server.builder import build_index
    from colgrid_server.corpus import iter_docstring_documents
    from colgrid_server.paths import DataDir
    from colgrid_server.storage import ObjectStorage

    data_dir, url, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    class Stalling:  # uploads three objects of the version, then stalls: the test kills the process here
        def __init__(self, fs):
            self._fs, self._puts = fs, 0
        def put_file(self, lpath, rpath, **kwargs):
            self._puts += "/indexes/" in rpath  # the encoder's objects go first
            if self._puts > 3:
                marker.touch()
                time.sleep(600)
            return self._fs.put_file(lpath, rpath, **kwargs)
        def __getattr__(self, name):
            return getattr(self._fs, name)

    storage = ObjectStorage(url, data_dir / "cache", filesystem=Stalling(fsspec.core.url_to_fs(url)[0]),
                            transfer_threads=1)
    with open_registry(DataDir(data_dir).registry_file) as registry:
        build_index(DataDir(data_dir), registry, "docs", iter_docstring_documents(limit=20), progress=False,
                    build_params={"n_centroids": 8}, storage=storage)
""")


def test_a_build_killed_mid_publish_stays_building_and_verify_reports_its_leftovers(
        s3, url, tmp_path, shared_data_dir, encoder_dir, monkeypatch, capsys):
    link_encoders(tmp_path, shared_data_dir)
    marker = tmp_path / "publishing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path), url, str(marker)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "the build ended before it was killed"
            assert time.monotonic() < deadline, "the build never reached its upload"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    with open_registry(DataDir(tmp_path).registry_file) as registry:
        (record,) = registry.list_versions(INDEX)
        assert record.state is VersionState.BUILDING and registry.get_rollout(INDEX).stable is None
    storage = ObjectStorage(url, tmp_path / "check-cache")
    uri = storage.uri_for(INDEX, record.version)
    assert storage.has_files(uri) and not s3.exists(f"{uri.removeprefix('s3://')}/{MANIFEST_NAME}")
    with pytest.raises(CorruptVersion, match="no manifest.json"):
        storage.fetch(uri)

    from colgrid_server.cli import main

    monkeypatch.setenv("COLGRID_STORAGE_URL", url)
    assert main(["index", "verify", INDEX, "--data-dir", str(tmp_path)]) == 0
    assert f"BUILDING, incomplete files at {uri}" in capsys.readouterr().out


def test_an_ingest_rpc_build_is_published_to_object_storage(s3, url, tmp_path, shared_data_dir, encoder_dir):
    """Versions built by the Ingest RPC land on S3 too, so other replicas can load them."""
    from colgrid_client import Client, IngestDoc

    link_encoders(tmp_path / "data", shared_data_dir)
    server, thread = start_live_server(tmp_path / "data", storage_url=url)
    try:
        with Client(server.target, timeout=120, retries=0) as client:
            docs = [IngestDoc.text(f"d{i}", f"document number {i} about {topic}")
                    for i, topic in enumerate(["json parsing", "sockets", "sorting", "dates", "regexes"] * 4)]
            result = client.ingest("ingested", docs, activate=True, n_centroids=8)
            assert result.version.storage_uri.startswith(url + "/indexes/ingested/")
            assert s3.exists(f"{result.version.storage_uri.removeprefix('s3://')}/{MANIFEST_NAME}")
            assert client.search("ingested", "parse json", k=1).hits[0].doc_id in {"d0", "d5", "d10", "d15"}
    finally:
        stop_live_server(server, thread)
    assert not (tmp_path / "data" / "indexes").exists()
