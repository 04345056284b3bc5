"""Encoder directories on object storage, so that a server that has never seen an encoder can
load the versions built with it (a replica on a fresh pod, an encoder cutover on Kubernetes).

Layout: <url>/encoders/<encoder id>/files/<the directory's files> and, uploaded LAST,
<url>/encoders/<encoder id>/manifest.json (size and sha256 of every file, and the directory's
name). Encoders are addressed by their id, the sha256 identity of their files, so a published
encoder never changes and publishing it again is a no-op.

A fetch downloads into a hidden directory under the encoders directory, checks every file
against the manifest and the whole directory against its id, then renames it into place as
<name>-<id[:12]>, where the server's encoder catalog finds it.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from collections.abc import Callable, Iterable
from typing import TypeVar

from colgrid_server.encoders import encoder_id
from colgrid_server.errors import FailedPrecondition, NotFound
from colgrid_server.index import MANIFEST_NAME
from colgrid_server.index._manifest import fsync_dir, fsync_tree, sha256_file
from colgrid_server.storage._base import get_checked, remote_errors
from colgrid_server.storage._cache import VersionCache

_T = TypeVar("_T")

log = logging.getLogger(__name__)
ENCODERS_PREFIX = "encoders"
FILES_DIR = "files"
ENCODER_MANIFEST_FORMAT = "colgrid-encoder-manifest-1"


class EncoderObjects:
    """ObjectStorage's encoder half: a mixin over the store's filesystem and helpers, which
    ObjectStorage defines (declared here for readers and type checkers)."""

    url: str
    cache: VersionCache
    _fs: Any
    _key: Callable[[str], str]  # the object key of a URI on this store
    _each: Callable[[Iterable[_T], Callable[[_T], None]], None]  # work on items, a few at a time

    def encoder_uri(self, ident: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", ident):
            raise NotFound(f"{ident!r} is not an encoder id (64 hex digits)", resource_type="encoder",
                           resource_name=ident)
        return f"{self.url}/{ENCODERS_PREFIX}/{ident}"

    def publish_encoder(self, directory: Path) -> str:
        """Upload the encoder directory unless its id is already there (manifest last); its URI."""
        directory = Path(directory)
        ident = encoder_id(directory)
        uri = self.encoder_uri(ident)
        key = self._key(uri)
        fs = self._fs
        with remote_errors(uri, "publish to"):
            if fs.exists(f"{key}/{MANIFEST_NAME}"):
                return uri
        files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(directory.rglob("*")) if p.is_file()}
        body = json.dumps({"format": ENCODER_MANIFEST_FORMAT, "encoder_id": ident, "name": directory.name,
                           "files": files}, indent=1, sort_keys=True).encode()
        started = time.monotonic()
        # A failed upload is left as it is, never removed: without its manifest it is never
        # fetched, the next publish overwrites it, and another builder may be uploading the very
        # same encoder (same id, same bytes) under it at this moment.
        with remote_errors(uri, "upload to"):
            self._each(sorted(files), lambda rel: fs.put_file(str(directory / rel), f"{key}/{FILES_DIR}/{rel}"))
            fs.pipe_file(f"{key}/{MANIFEST_NAME}", body)
        log.info("published encoder %s (%s): %d files, %.1f MB in %.2fs", directory.name, uri, len(files),
                 sum(e["size"] for e in files.values()) / 1e6, time.monotonic() - started)
        return uri

    def fetch_encoder(self, ident: str, root: Path) -> Path:
        """The directory under `root` holding encoder `ident`, downloaded if it is not there yet.
        NotFound when object storage has no such encoder either."""
        uri = self.encoder_uri(ident)
        key = self._key(uri)
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        with self.cache.locked(root / ident):  # one download per machine
            if (present := _present(root, ident)) is not None:
                return present
            manifest = self._encoder_manifest(uri, key, root)
            name = _safe_name(manifest.get("name"), ident)
            staged = root / f".{ident}.fetch-{secrets.token_hex(6)}"
            staged.mkdir()
            try:
                started = time.monotonic()
                files, corrupt = manifest["files"], partial(_corrupt, uri)
                with remote_errors(uri, "download"):
                    self._each(sorted(files), lambda rel: get_checked(self._fs, f"{key}/{FILES_DIR}/{rel}", staged / rel,
                                                                      rel, files[rel], corrupt))
                if encoder_id(staged) != ident:
                    raise _corrupt(uri, "the downloaded files do not have the encoder's id")
                fsync_tree(staged)
                target = root / name
                if target.exists():  # another encoder of that name: keep both, the full id tells them apart
                    target = root / f"{name}-{ident}"
                staged.rename(target)
                fsync_dir(root)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        log.info("fetched encoder %s into %s in %.2fs", uri, target, time.monotonic() - started)
        return target

    def _encoder_manifest(self, uri: str, key: str, root: Path) -> dict[str, Any]:
        with remote_errors(uri, "read"):
            try:
                body = self._fs.cat_file(f"{key}/{MANIFEST_NAME}")
            except FileNotFoundError:
                raise NotFound(f"encoder {uri.rsplit('/', 1)[1][:16]}… is neither in {root} nor on object storage "
                               f"({uri}); export it there (`colgrid encoder export`) or build a version with it on "
                               "this storage URL, which publishes it", resource_type="encoder",
                               resource_name=uri) from None
        try:
            manifest = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _corrupt(uri, "manifest.json is not valid JSON") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if manifest.get("format") != ENCODER_MANIFEST_FORMAT or not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                and not rel.startswith("/") and ".." not in rel.split("/") for rel, e in files.items()):
            raise _corrupt(uri, f"manifest.json is not a {ENCODER_MANIFEST_FORMAT} manifest")
        return manifest



def _present(root: Path, ident: str) -> Path | None:
    """A directory fetched earlier (by another thread or process): named after the id, and
    checked against it. Others were already scanned by the catalog, which asked for a fetch."""
    for path in sorted({*root.glob(f"*-{ident[:12]}"), *root.glob(f"*-{ident}")}):
        if not path.name.startswith(".") and (path / "encoder.json").is_file() and encoder_id(path) == ident:
            return path
    return None


def _safe_name(name: Any, ident: str) -> str:
    """<name>-<id[:12]>, as `import_encoder` names copies; the id alone for an unusable name."""
    base = name if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}", name) else "encoder"
    return base if base.endswith(ident[:12]) else f"{base}-{ident[:12]}"


def _corrupt(uri: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"encoder {uri}: {what}; publish it again from a good copy")
