"""A version that differs from its manifest in any way is refused, naming what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from colgrid_server.errors import CorruptVersion, NotFound
from colgrid_server.index import MANIFEST_NAME, open_version, verify_version, version_exists
from colgrid_server.index._manifest import write_manifest
from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    corpus = SyntheticCorpus(8, seed=5)
    path = tmp_path_factory.mktemp("pristine") / "v1"
    write_synthetic_version(path, corpus.documents(30), corpus.encoder, build_params={"n_centroids": 8})
    return path


@pytest.fixture()
def version(pristine, tmp_path) -> Path:
    copy = tmp_path / "v1"
    shutil.copytree(pristine, copy)
    return copy


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_published_version_opens(version):
    assert open_version(version).documents == 30
    assert len(verify_version(version)) == 64


def test_one_flipped_byte_in_any_file_is_detected_and_named(version):
    for rel in _files(version):
        if rel == MANIFEST_NAME:
            continue
        path = version / rel
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(CorruptVersion) as info:
            open_version(version)
        assert rel in str(info.value) and str(version) in str(info.value)
        assert info.value.version_path == str(version)
        path.write_bytes(original)
    assert open_version(version).documents == 30  # every file restored: clean again


def test_a_deleted_chunk_is_detected_and_named(version):
    (version / "tokens" / "c" / "0" / "0").unlink()
    with pytest.raises(CorruptVersion, match="tokens/c/0/0"):
        open_version(version)


def test_a_chunk_missing_from_disk_and_manifest_alike_is_still_corruption(version):
    # Zarr would read it as fill values; the reader must not.
    (version / "token_codes" / "c" / "0").unlink()
    (version / MANIFEST_NAME).unlink()
    write_manifest(version)
    with pytest.raises(CorruptVersion, match="chunk token_codes/c/0 of array token_codes is missing"):
        open_version(version)


def test_no_manifest_means_not_a_version(version):
    (version / MANIFEST_NAME).unlink()
    assert not version_exists(version)
    with pytest.raises(CorruptVersion, match="no manifest.json"):
        open_version(version)


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"format": "something-else", "files": {}}'])
def test_an_invalid_manifest_is_refused(version, body):
    (version / MANIFEST_NAME).write_bytes(body)
    with pytest.raises(CorruptVersion, match="manifest.json"):
        open_version(version)


def test_a_file_not_in_the_manifest_is_refused(version):
    (version / "tokens" / "c" / "99").mkdir(parents=True)
    (version / "tokens" / "c" / "99" / "0").write_bytes(b"extra")
    with pytest.raises(CorruptVersion, match="tokens/c/99/0 is not in manifest.json"):
        open_version(version)


def test_without_hash_verification_a_resized_file_is_still_refused(version):
    path = version / "doc_offsets" / "c" / "0"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptVersion, match="doc_offsets/c/0 has"):
        open_version(version, verify=False)


def test_manifest_listing_a_path_outside_the_version_is_refused(version):
    manifest = json.loads((version / MANIFEST_NAME).read_text())
    manifest["files"]["../escape"] = {"sha256": "0" * 64, "size": 1}
    (version / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersion, match="invalid entry"):
        open_version(version)


def test_a_missing_directory_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        open_version(tmp_path / "nope")
