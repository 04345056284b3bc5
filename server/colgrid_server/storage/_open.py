"""Choosing the store from settings, and opening a stored version for serving."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from colgrid_server.errors import CorruptVersion
from colgrid_server.index import LoadedVersion, open_version
from colgrid_server.paths import DataDir
from colgrid_server.storage._base import VersionStorage, is_remote_uri
from colgrid_server.storage._local import LocalStorage
from colgrid_server.storage._object import ObjectStorage

if TYPE_CHECKING:
    from colgrid_server.config import Settings

log = logging.getLogger(__name__)
CACHE_DIR_NAME = "cache"


def storage_for(settings: Settings) -> VersionStorage:
    """ObjectStorage when settings.storage_url is set (cache: storage_cache_dir, else
    <data_dir>/cache), else LocalStorage under the data dir."""
    data = DataDir(settings.data_dir)
    if not settings.storage_url:
        return LocalStorage(data)
    cache = Path(settings.storage_cache_dir) if settings.storage_cache_dir else data.root / CACHE_DIR_NAME
    return ObjectStorage(settings.storage_url, cache, cache_max_bytes=int(settings.storage_cache_max_gb * 2**30))


def open_stored(storage: VersionStorage, uri: str, *, manifest_sha256: str | None = None,
                device: str | None = None, screen: bool = False) -> LoadedVersion:
    """Fetch (remote: into the cache) and open with every sha256 checked. A cached copy that
    fails the check is fetched once more before the version is refused: the cache may be
    damaged while the stored version is intact. A cached copy stays pinned (never trimmed from
    the cache) until the returned version is closed."""
    pin = storage.pin(uri) if isinstance(storage, ObjectStorage) else None
    try:
        loaded = _open_fetched(storage, uri, manifest_sha256, device, screen)
    except BaseException:
        if pin is not None:
            pin.release()
        raise
    if pin is not None:
        object_storage = storage

        def unpin() -> None:  # an unloaded version's copy becomes the first to go, if over budget
            pin.release()
            if object_storage.cache_max_bytes:
                # Not on the caller's thread: the last lease often ends on a search worker, and
                # removing a copy of gigabytes takes a while.
                threading.Thread(target=object_storage.trim_cache, name="colgrid-cache-trim", daemon=True).start()

        loaded.on_close(unpin)
    return loaded


def _open_fetched(storage: VersionStorage, uri: str, manifest_sha256: str | None, device: str | None,
                  screen: bool) -> LoadedVersion:
    path = storage.fetch(uri, manifest_sha256=manifest_sha256)
    try:
        return open_version(path, verify=True, device=device, screen=screen)
    except CorruptVersion as exc:
        if not is_remote_uri(uri):
            raise
        log.warning("cached copy of %s failed its check (%s); fetching it again", uri, exc)
    path = storage.fetch(uri, manifest_sha256=manifest_sha256, refresh=True)
    return open_version(path, verify=True, device=device, screen=screen)
