"""On-disk vocabulary of an index version: names, format version and the small value types."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colgrid_server.errors import InvalidArgument

# 2: token payload chosen by a codec (attrs "codec"), token_codes uint16 when C <= 65536,
# attrs "normalized" and "token_spans". Version 1 groups (fp16, int32 codes) still open.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"

# Arrays of a version group (see DESIGN.md "Index versions").
TOKENS = "tokens"  # [N_tok, dim] float16, chunked on axis 0 (codec fp16)
TOKENS_INT8 = "tokens_int8"  # [N_tok, dim] int8 (codec int8): token = tokens_int8 * token_scales
TOKEN_SCALES = "token_scales"  # [N_tok] float32, per-token scale (codec int8)
RESIDUALS = "residuals"  # [N_tok, ceil(dim * nbits / 8)] uint8, packed bucket per dim (residual codecs)
RESIDUAL_CUTOFFS = "residual_cutoffs"  # [dim, 2^nbits - 1] float32, bucket boundaries per dim
RESIDUAL_WEIGHTS = "residual_weights"  # [dim, 2^nbits] float32, decoded value of each bucket per dim
# entropy codecs (see _entropy.py): blocks of codec attrs "block_rows" tokens, Rice-coded.
ENTROPY_BYTES = "entropy_bytes"  # [n_bytes] uint8, the coded blocks one after another
ENTROPY_BLOCK_OFFSETS = "entropy_block_offsets"  # [n_blocks + 1] int64, CSR over entropy_bytes
ENTROPY_UNARY_LENGTHS = "entropy_unary_lengths"  # [n_blocks, dim] uint32, bytes of each unary stream
ENTROPY_ROTATION = "entropy_rotation"  # [dim, dim] float32, orthonormal columns
ENTROPY_SCALES = "entropy_scales"  # [dim] float32, positive weight of each rotated coordinate
ENTROPY_RICE_K = "entropy_rice_k"  # [dim] uint8, Rice parameter of each rotated coordinate
DOC_OFFSETS = "doc_offsets"  # [N_doc + 1] int64, CSR over tokens
DOC_IDS = "doc_ids"  # [N_doc] strings
TOKEN_SPANS = "token_spans"  # [N_tok, 2] int32, character span [start, end) or (-1, -1)
TEXTS = "texts"  # [N_doc] strings, the document text the spans point into
METADATA = "metadata"  # [N_doc] JSON object strings
CENTROIDS = "centroids"  # [C, dim] float32, unit norm
TOKEN_CODES = "token_codes"  # [N_tok] uint16 (int32 past 65,536 centroids), nearest centroid per token
IVF_OFFSETS = "ivf_offsets"  # [C + 1] int64, CSR over ivf_docs
IVF_DOCS = "ivf_docs"  # [n_postings] int32, unique document indices per centroid, ascending
CENTROID_HNSW = "centroid_hnsw"  # [n_bytes] uint8, hnswlib graph over centroids (inner product)
# Image documents (pages), only in versions that have one (attrs "patches": true):
TOKEN_PATCH_COUNTS = "token_patch_counts"  # [N_tok] uint16, patches each token stands for (0: a text token)
PATCH_CELLS = "patch_cells"  # [n_cells, 2] int32, (row, col) in the page's patch grid, in token order
PATCH_BOXES = "patch_boxes"  # [n_cells, 4] int32, pixel box (x0, y0, x1, y1) on the page image
PATCH_ARRAYS = (TOKEN_PATCH_COUNTS, PATCH_CELLS, PATCH_BOXES)
PAGES_DIR = "pages"  # page images of image documents, named by document index

# Arrays every version has; the codec adds its own (CODEC_ARRAYS).
ARRAY_NAMES = (
    DOC_OFFSETS, DOC_IDS, TOKEN_SPANS, TEXTS, METADATA,
    CENTROIDS, TOKEN_CODES, IVF_OFFSETS, IVF_DOCS, CENTROID_HNSW,
)  # fmt: skip

CODECS = ("fp16", "int8", "residual4", "residual2", "entropy4", "entropy2")
DEFAULT_CODEC = "fp16"
CODEC_ARRAYS = {
    "fp16": (TOKENS,),
    "int8": (TOKENS_INT8, TOKEN_SCALES),
    "residual4": (RESIDUALS, RESIDUAL_CUTOFFS, RESIDUAL_WEIGHTS),
    "residual2": (RESIDUALS, RESIDUAL_CUTOFFS, RESIDUAL_WEIGHTS),
    **{
        name: (ENTROPY_BYTES, ENTROPY_BLOCK_OFFSETS, ENTROPY_UNARY_LENGTHS, ENTROPY_ROTATION, ENTROPY_SCALES, ENTROPY_RICE_K)
        for name in ("entropy4", "entropy2")
    },
}
EXTERNAL_KIND = "external"  # EncoderRef.kind of a version built from the caller's own vectors


@dataclass(frozen=True)
class EncoderRef:
    """Which encoder produced a version's vectors: queries must be encoded by the same one."""

    id: str
    kind: str
    dim: int

    def __post_init__(self) -> None:
        if not self.id or not self.kind:
            raise InvalidArgument("encoder id and kind must be non-empty", field="encoder")
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise InvalidArgument(f"encoder dim must be a positive integer, got {self.dim!r}", field="encoder")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "dim": self.dim}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> EncoderRef:
        return cls(id=str(value["id"]), kind=str(value["kind"]), dim=int(value["dim"]))


@dataclass(frozen=True)
class VersionSummary:
    """What `VersionWriter.finalize` published."""

    path: Path
    documents: int
    tokens: int
    centroids: int
    dim: int
    manifest_sha256: str
    build_seconds: float
    codec: str = DEFAULT_CODEC
    encoder: EncoderRef | None = None
