"""The local cache of versions fetched from object storage, with a size budget: least recently
used copies go first, a copy a server has loaded (in this process or another one) never goes, and
a server that moves to a new version lets the old copy go once it has unloaded it. Against a real
S3 server (moto), as in test_object_storage."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from colgrid_registry import open_registry
from colgrid_server.builder import build_index
from colgrid_server.errors import InvalidArgument
from colgrid_server.paths import DataDir
from colgrid_server.storage import ObjectStorage, open_stored
from tests.conftest import link_encoders, start_live_server, stop_live_server
from tests.test_object_storage import INDEX, files_of, new_bucket, s3, s3_server, tiny_version, url  # noqa: F401

VERSIONS = ("v1", "v2", "v3")


def wait_until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def copy_bytes(version_dir: Path) -> int:
    return sum(len(data) for data in files_of(version_dir).values())


@pytest.fixture()
def published(url, tiny_version, tmp_path) -> str:
    """The tiny version published three times (v1, v2, v3: same size) into a fresh bucket."""
    publisher = ObjectStorage(url, tmp_path / "publisher")
    for version in VERSIONS:
        publisher.publish(tiny_version, INDEX, version)
    return url


def cached(storage: ObjectStorage) -> set[str]:
    return {copy.path.name for copy in storage.cache.copies()}


def budgeted(url: str, tmp_path: Path, tiny_version: Path, copies: float) -> ObjectStorage:
    """A reader whose cache holds `copies` of the tiny version's size."""
    return ObjectStorage(url, tmp_path / "cache", cache_max_bytes=int(copies * copy_bytes(tiny_version)))


def test_without_a_budget_every_fetched_copy_stays(published, tiny_version, tmp_path):
    reader = ObjectStorage(published, tmp_path / "cache")
    for version in VERSIONS:
        reader.fetch(reader.uri_for(INDEX, version))
    assert cached(reader) == set(VERSIONS)
    assert reader.trim_cache() == []


def test_a_cache_over_its_budget_drops_the_least_recently_used_copy(published, tiny_version, tmp_path):
    reader = budgeted(published, tmp_path, tiny_version, 2.5)
    v1, v2, v3 = (reader.uri_for(INDEX, v) for v in VERSIONS)
    reader.fetch(v1)
    reader.fetch(v2)
    assert cached(reader) == {"v1", "v2"}
    reader.fetch(v1)  # a cache hit is a use: v2 is now the least recently used
    reader.fetch(v3)
    assert cached(reader) == {"v1", "v3"}
    assert files_of(reader.fetch(v2)) == files_of(tiny_version)  # fetched again, whole
    assert cached(reader) == {"v3", "v2"}
    assert sum(copy.size for copy in reader.cache.copies()) <= reader.cache_max_bytes


def test_a_loaded_version_is_never_trimmed_and_its_copy_goes_once_it_is_closed(published, tiny_version, tmp_path):
    reader = budgeted(published, tmp_path, tiny_version, 1.5)
    v1, v2, _ = (reader.uri_for(INDEX, v) for v in VERSIONS)
    loaded = open_stored(reader, v1)
    reader.fetch(v2)
    assert cached(reader) == {"v1", "v2"}  # over budget: v1 is in use
    assert loaded.documents == 60 and loaded.path == reader.build_dir(INDEX, "v1")
    loaded.close()  # unpins and trims (in the background): v1 is now the least recently used copy
    wait_until(lambda: cached(reader) == {"v2"}, "the closed version's copy is removed")


def test_a_version_that_fails_to_open_leaves_no_pin_behind(published, tiny_version, tmp_path):
    from colgrid_server.errors import CorruptVersion

    reader = budgeted(published, tmp_path, tiny_version, 1.5)
    v1, v2, _ = (reader.uri_for(INDEX, v) for v in VERSIONS)
    with pytest.raises(CorruptVersion):
        open_stored(reader, v1, manifest_sha256="0" * 64)
    reader.fetch(v1)
    reader.fetch(v2)
    assert cached(reader) == {"v2"}


def test_a_build_in_the_cache_is_not_trimmed_while_it_uploads(s3, url, tiny_version, tmp_path):
    """A trim that runs mid-upload (another thread unloading a version, say) leaves the build."""
    import shutil

    trims: list[list[Path]] = []

    class TrimmingMidUpload:
        def __init__(self, fs):
            self._fs = fs

        def put_file(self, lpath, rpath, **kwargs):
            if not trims:
                trims.append(storage.cache.trim(0))
            return self._fs.put_file(lpath, rpath, **kwargs)

        def __getattr__(self, name):
            return getattr(self._fs, name)

    storage = ObjectStorage(url, tmp_path / "cache", filesystem=TrimmingMidUpload(s3), cache_max_bytes=1,
                            transfer_threads=1)  # one upload at a time: the first one trims
    build_dir = storage.build_dir(INDEX, "v1")
    build_dir.parent.mkdir(parents=True)
    shutil.copytree(tiny_version, build_dir)
    uri = storage.publish(build_dir, INDEX, "v1")
    assert trims == [[]] and files_of(build_dir) == files_of(tiny_version)  # nothing was taken mid-upload
    assert ObjectStorage(url, tmp_path / "other").verify(uri)


PIN_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from colgrid_server.storage._cache import VersionCache

    pin = VersionCache(Path(sys.argv[1])).pin(Path(sys.argv[2]))
    print("pinned", flush=True)
    sys.stdin.readline()
    pin.release()
""")


def test_a_copy_loaded_by_another_process_sharing_the_cache_is_not_removed(published, tiny_version, tmp_path):
    reader = budgeted(published, tmp_path, tiny_version, 0.5)
    path = reader.fetch(reader.uri_for(INDEX, "v1"))
    holder = subprocess.Popen([sys.executable, "-c", PIN_HOLDER, str(reader.cache.root), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "pinned"
        assert reader.trim_cache() == [] and cached(reader) == {"v1"}
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
    finally:
        holder.kill()
    assert reader.trim_cache() == [path] and cached(reader) == set()


def test_a_negative_budget_is_refused_naming_the_setting(url, tmp_path):
    with pytest.raises(InvalidArgument) as info:
        ObjectStorage(url, tmp_path / "cache", cache_max_bytes=-1)
    assert info.value.field == "storage_cache_max_gb"


def test_the_budget_comes_from_colgrid_storage_cache_max_gb(tmp_path):
    from colgrid_server.config import Settings
    from colgrid_server.storage import storage_for

    settings = Settings.load({"data_dir": tmp_path}, environ={"COLGRID_STORAGE_URL": "s3://bucket/x",
                                                              "COLGRID_STORAGE_CACHE_MAX_GB": "0.5"})
    assert storage_for(settings).cache_max_bytes == 2**29
    assert storage_for(Settings(data_dir=tmp_path, storage_url="s3://bucket/x")).cache_max_bytes == 0


def test_a_server_moving_to_a_new_version_drops_the_old_copy_once_unloaded(
        s3, tmp_path, shared_data_dir, encoder_dir, stdlib_documents):
    """The previous stable stays loaded (a warm standby for rollback), so its copy stays; the one
    before it is unloaded when the next version becomes stable, and its copy goes then."""
    from colgrid_client import Client

    bucket = new_bucket(s3)
    builder = tmp_path / "builder"
    link_encoders(builder, shared_data_dir)
    versions: list[str] = []
    with open_registry(DataDir(builder).registry_file) as registry:
        for lo in (0, 40, 80):
            outcome = build_index(DataDir(builder), registry, INDEX, stdlib_documents[lo:lo + 40], progress=False,
                                  build_params={"n_centroids": 8}, activate=not versions,
                                  storage=ObjectStorage(bucket, builder / "cache"))
            versions.append(outcome.version)
    one_copy = max(copy.size for copy in ObjectStorage(bucket, builder / "cache").cache.copies())
    serving = tmp_path / "serving"
    link_encoders(serving, shared_data_dir)
    server, thread = start_live_server(serving, registry_url=str(DataDir(builder).registry_file), storage_url=bucket,
                                       storage_cache_max_gb=2.5 * one_copy / 2**30)
    try:
        cache = server.running.state.storage.cache
        with Client(server.target, timeout=60, retries=0) as client:
            assert client.search(INDEX, "parse json", k=3).version == versions[0]
            client.set_stable(INDEX, versions[1])
            assert {c.path.name for c in cache.copies()} == set(versions[:2])
            client.set_stable(INDEX, versions[2])
            assert client.search(INDEX, "parse json", k=3).version == versions[2]
            wait_until(lambda: {c.path.name for c in cache.copies()} == set(versions[1:]), "v1's copy is removed")
            client.set_stable(INDEX, versions[0])  # back to a version whose copy was removed: fetched again
            assert client.search(INDEX, "parse json", k=3).version == versions[0]
            wait_until(lambda: {c.path.name for c in cache.copies()} == {versions[2], versions[0]},
                       "v2's copy is removed")
    finally:
        stop_live_server(server, thread)
