"""Versions on S3-compatible object storage (fsspec; s3fs for s3://), served from a local cache.

Layout: <url>/indexes/<index>/<version>/<the version's files>, as under a data dir. Publishing
uploads every file, checks the listing against the manifest, and uploads manifest.json LAST:
its presence marks a complete version. A build that dies before that leaves a prefix without a
manifest, which is never fetched, never READY, and which `verify` reports.

Endpoint and credentials come from the standard AWS variables botocore reads (AWS_ENDPOINT_URL
for MinIO, moto or any S3-compatible server; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY;
AWS_DEFAULT_REGION) or from `storage_options` (passed to the fsspec filesystem as they are).
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from functools import partial
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from colgrid_server.errors import CorruptVersion, FailedPrecondition, InvalidArgument, NotFound
from colgrid_server.index import MANIFEST_NAME, verify_version
from colgrid_server.index._manifest import read_manifest, verify_files
from colgrid_server.storage._base import (HINT, INDEXES_PREFIX, StorageUnavailable, check_object, get_checked,
                                          is_remote_uri, remote_errors)
from colgrid_server.storage._cache import Pin, VersionCache
from colgrid_server.storage._encoder_objects import EncoderObjects

log = logging.getLogger(__name__)
_T = TypeVar("_T")
TRANSFER_THREADS = 8  # objects moved at once: latency-bound per object, so a few in flight
_READ_BYTES = 4 << 20


class ObjectStorage(EncoderObjects):
    """remote=True. `url`: s3://bucket[/prefix]; `cache_dir`: where fetched versions (and
    versions built here) live on local disk; `filesystem`: an fsspec filesystem to use instead
    of the one `url` and `storage_options` select; `cache_max_bytes`: trim the cache to this
    many bytes after each fetch and publish, least recently used copies first (0: no limit)."""

    remote = True

    def __init__(self, url: str, cache_dir: Path, storage_options: Mapping[str, Any] | None = None, *,
                 filesystem: Any = None, transfer_threads: int = TRANSFER_THREADS, cache_max_bytes: int = 0) -> None:
        if not is_remote_uri(url):
            raise InvalidArgument(f"storage_url must be an object-storage URL such as s3://bucket/prefix, "
                                  f"not {url!r}", field="storage_url")
        self.scheme = url.partition("://")[0].lower()
        if filesystem is None:
            import fsspec  # only servers that use object storage pay for the backend's import

            try:
                # Listings are never cached: other machines publish and delete under the same prefix.
                options = {"use_listings_cache": False, **(storage_options or {})}
                filesystem, root = fsspec.core.url_to_fs(url, **options)
            except (ImportError, ValueError) as exc:
                raise InvalidArgument(f"storage_url {url!r}: no usable fsspec backend for {self.scheme}:// ({exc})",
                                      field="storage_url") from exc
        else:
            root = filesystem._strip_protocol(url)
        root = str(root).strip("/")
        if not root:
            raise InvalidArgument(f"storage_url {url!r} names no bucket", field="storage_url")
        self.url = f"{self.scheme}://{root}"
        self.cache = VersionCache(Path(cache_dir))
        self._fs = filesystem
        self._threads = max(1, transfer_threads)
        if cache_max_bytes < 0:
            raise InvalidArgument(f"the cache budget must be >= 0 bytes (0: no limit), not {cache_max_bytes}",
                                  field="storage_cache_max_gb")
        self.cache_max_bytes = cache_max_bytes

    def __repr__(self) -> str:
        return f"ObjectStorage({self.url!r}, cache={str(self.cache.root)!r})"

    # --- names ----------------------------------------------------------------------------------

    def uri_for(self, index: str, version: str) -> str:
        return f"{self.url}/{INDEXES_PREFIX}/{index}/{version}"

    def build_dir(self, index: str, version: str) -> Path:
        """The version's place in the cache: once published, it is already a valid cached copy."""
        return self.cache.path_for(self.uri_for(index, version))

    def _key(self, uri: str) -> str:
        scheme, _, rest = uri.partition("://")
        if scheme.lower() != self.scheme:
            raise FailedPrecondition(f"index version {uri} is not on this server's object storage "
                                     f"({self.url}); set COLGRID_STORAGE_URL to a URL on its store")
        key = rest.strip("/")
        if not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise InvalidArgument(f"{uri!r} is not an object-storage URI of a version", field="storage_uri")
        return key

    # --- publish --------------------------------------------------------------------------------

    def publish(self, local_dir: Path, index: str, version: str) -> str:
        local_dir = Path(local_dir).resolve()
        # A build in the cache (build_dir) is pinned while it uploads: no trim may take it.
        pin = self.cache.pin(local_dir) if local_dir.is_relative_to(self.cache.root) else None
        try:
            return self._publish(local_dir, index, version)
        finally:
            if pin is not None:
                pin.release()

    def _publish(self, local_dir: Path, index: str, version: str) -> str:
        files, _ = read_manifest(local_dir)  # CorruptVersion for an unfinished build
        verify_files(local_dir, files, hashes=False)
        uri = self.uri_for(index, version)
        key = self._key(uri)
        started = time.monotonic()
        with remote_errors(uri, "publish to"):
            if self._fs.exists(f"{key}/{MANIFEST_NAME}"):
                raise FailedPrecondition(f"index version {uri} already exists; published versions are immutable")
            if self._listing(key):  # an interrupted earlier attempt: start from nothing
                self._remove(key)
        try:
            with remote_errors(uri, "upload to"):
                self._each(sorted(files), lambda rel: self._fs.put_file(str(local_dir / rel), f"{key}/{rel}"))
                self._check_listing(uri, key, files)
                self._fs.put_file(str(local_dir / MANIFEST_NAME), f"{key}/{MANIFEST_NAME}")
        except BaseException:
            self._remove_quietly(uri, key)
            raise
        size = sum(entry["size"] for entry in files.values())
        log.info("published %s: %d files, %.1f MB in %.2fs", uri, len(files) + 1, size / 1e6,
                 time.monotonic() - started)
        self.trim_cache(keep=local_dir)  # the new version is kept: it is about to be served
        return uri

    # --- fetch ----------------------------------------------------------------------------------

    def fetch(self, uri: str, *, manifest_sha256: str | None = None, refresh: bool = False) -> Path:
        if not is_remote_uri(uri):
            return Path(uri)  # a version published before object storage was configured
        key = self._key(uri)
        local = self.cache.path_for(uri)
        with self.cache.locked(local):
            self.cache.touch(local)  # the copy being fetched is the newest: the last a trim would take
            fetched = self._fetch_locked(uri, key, local, manifest_sha256, refresh)
        self.trim_cache(keep=local)  # outside the lock: a trim takes other copies' locks
        return fetched

    def _fetch_locked(self, uri: str, key: str, local: Path, manifest_sha256: str | None, refresh: bool) -> Path:
        if local.exists():
            if not refresh and self.cache.usable(local, manifest_sha256):
                return local
            log.warning("cached copy %s of %s is %s: fetching it again", local, uri,
                        "suspect" if refresh else "damaged or stale")
            self.cache.discard(local)
        staged = self.cache.staging(local)
        try:
            started = time.monotonic()
            files = self._download(uri, key, staged, manifest_sha256)
            self.cache.install(staged, local)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("fetched %s into %s: %d files in %.2fs", uri, local, len(files) + 1, time.monotonic() - started)
        return local

    def pin(self, uri: str) -> Pin | None:
        """Hold the cached copy of `uri` against trimming until the pin is released (a server
        pins each version it has loaded); None for a local path."""
        return self.cache.pin(self.cache.path_for(uri)) if is_remote_uri(uri) else None

    def trim_cache(self, keep: Path | None = None) -> list[Path]:
        """Bring the cache within its budget (no-op without one); the copies removed. Never
        raises: a failed trim must not fail the fetch or publish that asked for it."""
        if not self.cache_max_bytes:
            return []
        try:
            return self.cache.trim(self.cache_max_bytes, keep=[keep] if keep is not None else [])
        except OSError as exc:
            log.warning("could not trim the version cache %s: %s", self.cache.root, exc)
            return []

    def _download(self, uri: str, key: str, staged: Path, manifest_sha256: str | None) -> dict[str, dict[str, Any]]:
        """Every file of the manifest into `staged`, each checked against its size and sha256."""
        (staged / MANIFEST_NAME).write_bytes(self._manifest_bytes(uri, key))
        files, sha = _parsed(staged, uri)
        if manifest_sha256 and sha != manifest_sha256:
            raise CorruptVersion(f"index version {uri}: its manifest.json ({sha[:12]}…) is not the one the registry "
                                 f"recorded ({manifest_sha256[:12]}…)", version_path=uri)

        corrupt = partial(_corrupt, uri)
        with remote_errors(uri, "download"):
            self._each(sorted(files), lambda rel: get_checked(self._fs, f"{key}/{rel}", staged / rel, rel, files[rel],
                                                              corrupt))
        return files

    # --- verify, list, delete -------------------------------------------------------------------

    def verify(self, uri: str) -> str:
        """Remote: the listing against the manifest, then every object's sha256 (streamed, not kept)."""
        if not is_remote_uri(uri):
            return verify_version(Path(uri))
        key = self._key(uri)
        with tempfile.TemporaryDirectory(prefix="colgrid-verify-") as tmp:
            (Path(tmp) / MANIFEST_NAME).write_bytes(self._manifest_bytes(uri, key))
            files, sha = _parsed(Path(tmp), uri)

        def check(rel: str) -> None:
            size, digest = self._stream_hash(f"{key}/{rel}")
            check_object(rel, files[rel], size, lambda: digest, partial(_corrupt, uri))

        with remote_errors(uri, "verify"):
            self._check_listing(uri, key, files)
            self._each(sorted(files), check)
        return sha

    def has_files(self, uri: str) -> bool:
        if not is_remote_uri(uri):
            return Path(uri).exists()
        key = self._key(uri)
        with remote_errors(uri, "list"):
            return bool(self._listing(key))

    def delete(self, uri: str) -> None:
        """The objects (manifest first) and the cached copy."""
        if not is_remote_uri(uri):
            from colgrid_server.storage._local import LocalStorage

            LocalStorage().delete(uri)
            return
        key = self._key(uri)
        with remote_errors(uri, "delete"):
            self._remove(key)
        local = self.cache.path_for(uri)
        with self.cache.locked(local):
            self.cache.discard(local)

    # --- helpers --------------------------------------------------------------------------------

    def _manifest_bytes(self, uri: str, key: str) -> bytes:
        with remote_errors(uri, "read"):
            try:
                return self._fs.cat_file(f"{key}/{MANIFEST_NAME}")
            except FileNotFoundError:
                bucket = key.split("/", 1)[0]
                self._fs.invalidate_cache(bucket)
                if not self._fs.exists(bucket):
                    raise StorageUnavailable(f"object storage: bucket {self.scheme}://{bucket} does not exist "
                                             f"(reading {uri}); {HINT}", version_path=uri) from None
                if not self._listing(key):
                    raise NotFound(f"index version {uri} does not exist", resource_type="index version",
                                   resource_name=uri) from None
                raise _corrupt(uri, "no manifest.json on object storage (an incomplete or interrupted build)") from None

    def _listing(self, key: str) -> dict[str, int]:
        """{relative path: size} of every object under key/ (fresh: no listing cache)."""
        self._fs.invalidate_cache(key)
        try:
            found = self._fs.find(key, detail=True)
        except FileNotFoundError:
            return {}
        prefix = key + "/"
        return {name[len(prefix):]: int(info["size"]) for name, info in found.items() if name.startswith(prefix)}

    def _check_listing(self, uri: str, key: str, files: Mapping[str, Mapping[str, Any]]) -> None:
        listing = self._listing(key)
        listing.pop(MANIFEST_NAME, None)
        if missing := sorted(set(files) - set(listing)):
            raise _corrupt(uri, f"object {missing[0]} listed in manifest.json is missing ({len(missing)} missing)")
        if extra := sorted(set(listing) - set(files)):
            raise _corrupt(uri, f"object {extra[0]} is not in manifest.json ({len(extra)} unexpected)")
        for rel in sorted(files):
            if listing[rel] != files[rel]["size"]:
                raise _corrupt(uri, f"object {rel} has {listing[rel]} bytes, manifest.json says {files[rel]['size']}")

    def _stream_hash(self, path: str) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        with self._fs.open(path, "rb", block_size=_READ_BYTES) as fh:
            while block := fh.read(_READ_BYTES):
                digest.update(block)
                size += len(block)
        return size, digest.hexdigest()

    def _remove(self, key: str) -> None:
        try:
            self._fs.rm_file(f"{key}/{MANIFEST_NAME}")  # first: a half-removed version is never complete
        except FileNotFoundError:
            pass
        if self._listing(key):
            self._fs.rm(key, recursive=True)
        self._fs.invalidate_cache(key)

    def _remove_quietly(self, uri: str, key: str) -> None:
        """Best effort after a failed publish: what stays behind has no manifest (never complete)."""
        try:
            self._remove(key)
        except Exception as exc:  # noqa: BLE001 - the publish error is the one to report
            log.warning("could not remove the incomplete upload %s (%s); it has no manifest.json and is never "
                        "served; remove it with ObjectStorage.delete", uri, exc)

    def _each(self, items: Iterable[_T], work: Callable[[_T], None]) -> None:
        """work(item) for every item, a few at a time; the first error stops the rest and is raised."""
        with ThreadPoolExecutor(self._threads, thread_name_prefix="colgrid-storage") as pool:
            futures = [pool.submit(work, item) for item in items]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise


def _parsed(root: Path, uri: str) -> tuple[dict[str, dict[str, Any]], str]:
    """read_manifest on a downloaded manifest, its errors naming the remote version."""
    try:
        return read_manifest(root)
    except CorruptVersion as exc:
        raise CorruptVersion(str(exc).replace(str(root), uri), version_path=uri) from None


def _corrupt(uri: str, what: str) -> CorruptVersion:
    return CorruptVersion(f"index version {uri}: {what}", version_path=uri)
