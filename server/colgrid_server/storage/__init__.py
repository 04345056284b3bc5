"""Where index versions live (DESIGN.md "Index versions": local directory or object storage).

    VersionStorage      the contract: uri_for, build_dir, publish, fetch, verify, has_files, delete
    ├── LocalStorage    <data_dir>/indexes/<index>/<version>; the URI is the directory
    └── ObjectStorage   <url>/indexes/<index>/<version> on S3-compatible storage (fsspec/s3fs),
                        manifest.json uploaded last; fetched whole into a local cache

Versions are always built and served from local files: object storage is where they are
published and where other machines fetch them from, never read per query. `storage_for(settings)`
picks the backend; `open_stored` fetches and opens a version for serving.
"""
from __future__ import annotations

from colgrid_server.storage._base import StorageUnavailable, VersionStorage, is_remote_uri
from colgrid_server.storage._local import LocalStorage
from colgrid_server.storage._object import ObjectStorage
from colgrid_server.storage._open import open_stored, storage_for

__all__ = [
    "LocalStorage",
    "ObjectStorage",
    "StorageUnavailable",
    "VersionStorage",
    "is_remote_uri",
    "open_stored",
    "storage_for",
]
