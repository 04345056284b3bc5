"""Encoders on object storage: a build publishes its encoder beside its version, a server whose
data dir lacks an encoder fetches it (checked file by file and against its id) before loading a
version that pins it, and a damaged or missing encoder is refused with a message that says what
to do. Against a real S3 server (moto), with a real tiny ONNX encoder."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from colgrid_registry import open_registry
from colgrid_server.builder import build_index
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.encoders import encoder_id
from colgrid_server.errors import FailedPrecondition, NotFound
from colgrid_server.paths import DataDir
from colgrid_server.storage import ObjectStorage, StorageUnavailable
from tests.conftest import start_live_server, stop_live_server
from tests.test_object_storage import INDEX, RecordingFS, files_of, flip_byte, new_bucket, s3, s3_server, url  # noqa: F401
from tests.test_rollout_support import tiny_checkpoint, tiny_encoder_dir  # noqa: F401 - fixtures


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def hidden_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.is_dir())


def test_a_published_encoder_is_fetched_whole_under_its_name_and_id(s3, url, tiny_encoder_dir, tmp_path):
    ident = encoder_id(tiny_encoder_dir)
    store = ObjectStorage(url, tmp_path / "cache")
    assert store.publish_encoder(tiny_encoder_dir) == f"{url}/encoders/{ident}"
    path = ObjectStorage(url, tmp_path / "other-cache").fetch_encoder(ident, tmp_path / "encoders")
    assert path.name == f"{tiny_encoder_dir.name}-{ident[:12]}"
    assert files_of(path) == files_of(tiny_encoder_dir) and encoder_id(path) == ident
    assert visible(tmp_path / "encoders") == [path.name] and hidden_dirs(tmp_path / "encoders") == []


def test_publishing_an_encoder_twice_uploads_it_once_and_fetching_twice_downloads_it_once(
        s3, url, tiny_encoder_dir, tmp_path):
    recording = RecordingFS(s3)
    store = ObjectStorage(url, tmp_path / "cache", filesystem=recording)
    store.publish_encoder(tiny_encoder_dir)
    uploads = len(recording.puts)
    assert uploads == len(files_of(tiny_encoder_dir))
    store.publish_encoder(tiny_encoder_dir)  # content-addressed: already there
    assert len(recording.puts) == uploads
    ident = encoder_id(tiny_encoder_dir)
    first = store.fetch_encoder(ident, tmp_path / "encoders")
    assert store.fetch_encoder(ident, tmp_path / "encoders") == first
    assert len(recording.gets) == uploads


def test_concurrent_lookups_of_a_missing_encoder_fetch_it_once(s3, url, tiny_encoder_dir, tmp_path):
    recording = RecordingFS(s3)
    store = ObjectStorage(url, tmp_path / "cache", filesystem=recording)
    store.publish_encoder(tiny_encoder_dir)
    catalog = EncoderCatalog(tmp_path / "encoders", fetch=store.fetch_encoder)
    ident = encoder_id(tiny_encoder_dir)
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(catalog.path_for(ident))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 4 and len(set(found)) == 1
    assert len(recording.gets) == len(files_of(tiny_encoder_dir))
    assert catalog.get(ident).dim == 32


def test_a_damaged_encoder_object_is_refused_and_nothing_is_installed(s3, url, tiny_encoder_dir, tmp_path):
    store = ObjectStorage(url, tmp_path / "cache")
    uri = store.publish_encoder(tiny_encoder_dir)
    biggest = max(files_of(tiny_encoder_dir).items(), key=lambda item: len(item[1]))[0]
    key = f"{uri.removeprefix('s3://')}/files/{biggest}"
    s3.pipe_file(key, flip_byte(s3.cat_file(key)))
    with pytest.raises(FailedPrecondition, match=f"{biggest} does not match its sha256") as info:
        store.fetch_encoder(encoder_id(tiny_encoder_dir), tmp_path / "encoders")
    assert "publish it again" in str(info.value)
    assert visible(tmp_path / "encoders") == [] and hidden_dirs(tmp_path / "encoders") == []


def test_an_encoder_whose_upload_failed_half_way_is_not_found(s3, url, tiny_encoder_dir, tmp_path):
    failing = ObjectStorage(url, tmp_path / "cache", filesystem=RecordingFS(s3, fail_after=2), transfer_threads=1)
    with pytest.raises(StorageUnavailable, match="injected"):
        failing.publish_encoder(tiny_encoder_dir)
    with pytest.raises(NotFound, match="colgrid encoder export"):
        ObjectStorage(url, tmp_path / "cache").fetch_encoder(encoder_id(tiny_encoder_dir), tmp_path / "encoders")


def test_a_catalog_without_object_storage_names_what_to_do(tmp_path):
    with pytest.raises(NotFound, match="colgrid encoder export"):
        EncoderCatalog(tmp_path / "encoders").path_for("ab" * 32)


def test_colgrid_encoder_publish_uploads_to_the_storage_url(s3, url, tiny_encoder_dir, tmp_path, monkeypatch, capsys):
    from colgrid_server.cli import main

    monkeypatch.setenv("COLGRID_STORAGE_URL", url)
    assert main(["encoder", "publish", str(tiny_encoder_dir), "--data-dir", str(tmp_path)]) == 0
    assert f"{url}/encoders/{encoder_id(tiny_encoder_dir)}" in capsys.readouterr().out
    monkeypatch.delenv("COLGRID_STORAGE_URL")
    assert main(["encoder", "publish", str(tiny_encoder_dir), "--data-dir", str(tmp_path)]) == 2
    assert "COLGRID_STORAGE_URL" in capsys.readouterr().err


def test_a_server_without_the_encoder_fetches_it_from_object_storage_and_serves(
        s3, tmp_path, tiny_encoder_dir, stdlib_documents):
    """The builder's data dir has the encoder; the serving data dir has no encoders at all."""
    from colgrid_client import Client

    bucket = new_bucket(s3)
    builder = DataDir(tmp_path / "builder")
    with open_registry(builder.registry_file) as registry:
        outcome = build_index(builder, registry, INDEX, stdlib_documents[:50], progress=False,
                              build_params={"n_centroids": 8}, encoder_dir=tiny_encoder_dir,
                              storage=ObjectStorage(bucket, tmp_path / "builder-cache"))
    ident = encoder_id(tiny_encoder_dir)
    assert s3.exists(f"{bucket.removeprefix('s3://')}/encoders/{ident}/manifest.json")
    serving = tmp_path / "serving"
    server, thread = start_live_server(serving, registry_url=str(builder.registry_file), storage_url=bucket)
    try:
        with Client(server.target, timeout=60, retries=0) as client:
            result = client.search(INDEX, "parse a json document", k=3)
        assert result.version == outcome.version and len(result.hits) == 3
        (fetched,) = visible(serving / "encoders")
        assert encoder_id(serving / "encoders" / fetched) == ident
    finally:
        stop_live_server(server, thread)
