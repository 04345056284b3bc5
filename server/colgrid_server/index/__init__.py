"""Index versions: immutable, checksummed Zarr v3 groups (DESIGN.md "Index versions").

Write with `VersionWriter` (or `build_version` from documents and an encoder); serve with
`open_version`, which refuses anything that does not match its manifest.
"""
from __future__ import annotations

from colgrid_server.index._build import DocumentEncoder, build_version
from colgrid_server.index._centroids import centroid_count
from colgrid_server.index._format import FORMAT_VERSION, MANIFEST_NAME, EncoderRef, VersionSummary
from colgrid_server.index._reader import LoadedVersion, open_version, verify_version, version_exists
from colgrid_server.index._writer import VersionWriter

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "DocumentEncoder",
    "EncoderRef",
    "LoadedVersion",
    "VersionSummary",
    "VersionWriter",
    "build_version",
    "centroid_count",
    "open_version",
    "verify_version",
    "version_exists",
]
