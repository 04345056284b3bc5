"""Index versions: immutable, checksummed Zarr v3 groups (DESIGN.md "Index versions").

Write with `VersionWriter` (or `build_version` from documents and an encoder, or
`build_version_from_arrays` from precomputed vectors, e.g. read by `load_vector_files`); pick
how tokens are stored with build_params["codec"] (fp16, int8, residual4, residual2, entropy4,
entropy2); serve with `open_version`, which refuses anything that does not match its manifest.
"""
from __future__ import annotations

from colgrid_server.index._build import DocumentEncoder, build_version
from colgrid_server.index._centroids import centroid_count
from colgrid_server.index._external import build_version_from_arrays, external_encoder_ref, external_version_writer, is_external
from colgrid_server.index._format import CODECS, DEFAULT_CODEC, FORMAT_VERSION, MANIFEST_NAME, EncoderRef, VersionSummary
from colgrid_server.index._reader import LoadedVersion, open_version, verify_version, version_exists
from colgrid_server.index._stores import DenseTokens, Int8Tokens, ResidualTokens, TokenStore
from colgrid_server.index._vector_files import BFloat16Rows, VectorFiles, load_vector_files
from colgrid_server.index._writer import VersionWriter

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "BFloat16Rows",
    "build_version",
    "build_version_from_arrays",
    "centroid_count",
    "DenseTokens",
    "DocumentEncoder",
    "EncoderRef",
    "external_encoder_ref",
    "external_version_writer",
    "Int8Tokens",
    "is_external",
    "load_vector_files",
    "LoadedVersion",
    "open_version",
    "ResidualTokens",
    "TokenStore",
    "VectorFiles",
    "verify_version",
    "version_exists",
    "VersionSummary",
    "VersionWriter",
]
