"""Versions as directories under the data dir: what colgrid does without object storage."""
from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from colgrid_server.errors import FailedPrecondition
from colgrid_server.index import MANIFEST_NAME, verify_version, version_exists
from colgrid_server.index._manifest import fsync_dir
from colgrid_server.paths import DataDir
from colgrid_server.storage._base import is_remote_uri


class LocalStorage:
    """A version's URI is its absolute directory, <data_dir>/indexes/<index>/<version>. Built in
    place (the version writer publishes with one rename), so `publish` only checks; `fetch`
    returns the directory itself."""

    remote = False

    def __init__(self, data: DataDir | Path | None = None) -> None:
        """data: the data dir versions are built under (reading a URI needs none)."""
        self._data = DataDir(Path(data)) if isinstance(data, (str, Path)) else data

    def uri_for(self, index: str, version: str) -> str:
        return str(self.build_dir(index, version))

    def build_dir(self, index: str, version: str) -> Path:
        if self._data is None:
            raise FailedPrecondition("this LocalStorage has no data dir to build versions in; "
                                     "construct it with LocalStorage(data_dir)")
        return self._data.version_dir(index, version).resolve()

    def publish(self, local_dir: Path, index: str, version: str) -> str:
        """The version already in place is checked; one built elsewhere is copied in (to a hidden
        directory, then renamed: never visible half-copied)."""
        local_dir, target = Path(local_dir).resolve(), self.build_dir(index, version)
        if not version_exists(local_dir):
            raise FailedPrecondition(f"cannot publish {local_dir}: it has no {MANIFEST_NAME} (an unfinished build)")
        if local_dir != target:
            if target.exists():
                raise FailedPrecondition(f"index version {target} already exists; published versions are immutable")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.copy-{secrets.token_hex(6)}"
            try:
                shutil.copytree(local_dir, tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(target.parent)
        return str(target)

    def fetch(self, uri: str, *, manifest_sha256: str | None = None, refresh: bool = False) -> Path:
        """The directory itself (open_version checks it against its manifest)."""
        if is_remote_uri(uri):
            raise FailedPrecondition(
                f"index version {uri} is on object storage, but this server has no storage_url: set "
                f"COLGRID_STORAGE_URL (e.g. s3://bucket/prefix) and the AWS_* credentials to read it")
        return Path(uri)

    def verify(self, uri: str) -> str:
        return verify_version(self.fetch(uri))

    def has_files(self, uri: str) -> bool:
        return not is_remote_uri(uri) and Path(uri).exists()

    def delete(self, uri: str) -> None:
        path = self.fetch(uri)
        (path / MANIFEST_NAME).unlink(missing_ok=True)  # first: a half-removed version is never complete
        shutil.rmtree(path, ignore_errors=True)
