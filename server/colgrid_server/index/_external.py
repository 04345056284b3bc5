"""Versions from the caller's own vectors ("bring your own vectors"): a token matrix, CSR
offsets per document and ids, embedded elsewhere (a GPU farm, another engine's encoder).

Such a version records an external encoder, `external:<sha256 of dim and normalisation>`, so
that two external versions of the same dim and normalisation accept the same query vectors,
and no text query can reach it unless an encoder is attached (`is_external`)."""
from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from colgrid_server.documents import MAX_DOC_ID_CHARS
from colgrid_server.errors import InvalidArgument
from colgrid_server.index._format import EXTERNAL_KIND, EncoderRef, VersionSummary
from colgrid_server.index._validate import first_duplicate
from colgrid_server.index._writer import VersionWriter

# Input read and validated per step, as float32: bounds memory whatever the corpus size, large
# enough that per-block overhead does not show.
BLOCK_BYTES = 4 << 20


class TokenRows(Protocol):
    """What build_version_from_arrays reads tokens through: a numpy array or memmap, or any
    object with shape, dtype and row slicing (the safetensors bfloat16 reader)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


def external_encoder_ref(dim: int, normalized: bool) -> EncoderRef:
    """The encoder a version of external vectors records: the same for every version with the
    same dim and normalisation."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise InvalidArgument(f"dim must be a positive integer, got {dim!r}", field="tokens")
    identity = json.dumps({"dim": dim, "normalization": _normalization(normalized)}, sort_keys=True)
    return EncoderRef(id=f"external:{hashlib.sha256(identity.encode()).hexdigest()}", kind=EXTERNAL_KIND, dim=dim)


def is_external(encoder: EncoderRef) -> bool:
    """True for a version built from external vectors: it can only be searched with query
    vectors, unless an encoder is attached (the server answers FAILED_PRECONDITION otherwise)."""
    return encoder.kind == EXTERNAL_KIND


def external_version_writer(
    final_dir: Path, *, dim: int, normalized: bool, build_params: Mapping[str, Any] | None = None
) -> VersionWriter:
    """A VersionWriter for external vectors of this dim and normalisation, for callers that
    stream documents one by one (the ingest RPC): writer.add(doc_id, vectors, metadata=...)
    with no spans, then writer.finalize(). Use it as a context manager."""
    if not isinstance(normalized, bool):
        raise InvalidArgument(f"normalized must be true or false, got {normalized!r}", field="normalized")
    attrs = {"vectors": {"source": "external", "normalization": _normalization(normalized)}}
    encoder = external_encoder_ref(dim, normalized)
    return VersionWriter(Path(final_dir), encoder=encoder, build_params=build_params, normalized=normalized, extra_attrs=attrs)


def build_version_from_arrays(
    final_dir: Path,
    *,
    tokens: np.ndarray | TokenRows,
    doc_offsets: np.ndarray | Sequence[int],
    doc_ids: Sequence[str],
    texts: Sequence[str] | None = None,
    metadata: Sequence[Mapping[str, Any] | None] | None = None,
    normalized: bool,
    build_params: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> VersionSummary:
    """Publish a version at final_dir from precomputed multi-vectors: document i owns
    tokens[doc_offsets[i]:doc_offsets[i + 1]] of tokens (N_tok, dim) floats, read about
    BLOCK_BYTES at a time, so a memory-mapped array is never loaded whole. normalized declares
    unit L2 norm tokens (checked). No token spans are stored; texts only when given.
    InvalidArgument names the field at fault (tokens, doc_offsets, doc_ids, texts, metadata,
    normalized, build_params.*); nothing is published then."""
    if not isinstance(normalized, bool):
        raise InvalidArgument(f"normalized must be true or false, got {normalized!r}", field="normalized")
    n_tok, dim = _check_tokens(tokens)
    offsets = _check_offsets(doc_offsets, n_tok)
    n_doc = offsets.shape[0] - 1
    ids = _check_ids(doc_ids, n_doc)
    texts = _check_per_document(texts, n_doc, "texts")
    metadata = _check_per_document(metadata, n_doc, "metadata")
    if texts is not None and not all(isinstance(t, str) for t in texts):
        raise InvalidArgument("texts must be strings, one per document", field="texts")

    writer = external_version_writer(final_dir, dim=dim, normalized=normalized, build_params=build_params)
    with writer, tqdm(total=n_tok, desc="write vectors", unit="tok", disable=not progress) as bar:
        for first, last in _blocks(offsets, max(1, BLOCK_BYTES // (4 * dim))):
            lo, hi = int(offsets[first]), int(offsets[last])
            writer.add_block(
                ids[first:last],
                np.asarray(tokens[lo:hi]),
                np.diff(offsets[first : last + 1]),
                texts=None if texts is None else texts[first:last],
                metadata=None if metadata is None else metadata[first:last],
            )
            _release_rows(tokens, lo, hi)
            bar.update(hi - lo)
        return writer.finalize(progress=progress)


def _release_rows(tokens: np.ndarray | TokenRows, lo: int, hi: int) -> None:
    """Drop the pages of a memory-mapped input's rows [lo, hi) once written: each row is read
    once, and otherwise every page read stays in the builder's resident memory until the end
    (7.6 GB of 7.8 GB file-backed RSS for 10.7M 384-d tokens, through k-means and assignment,
    which never read them again). Clean file pages: the kernel rereads them if ever needed."""
    mapped = getattr(tokens, "_mmap", None)
    if not isinstance(tokens, np.memmap) or mapped is None or not tokens.flags.c_contiguous or hi <= lo:
        return
    row_bytes = tokens.strides[0]
    start = tokens.offset % mmap.ALLOCATIONGRANULARITY  # where the array begins in the mapping
    first = -(-(start + lo * row_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + hi * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        try:
            mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
        except (OSError, ValueError, AttributeError):  # advice only: never fail a build over it
            pass


def _normalization(normalized: bool) -> str:
    return "l2" if normalized else "none"


def _check_tokens(tokens: np.ndarray | TokenRows) -> tuple[int, int]:
    shape = getattr(tokens, "shape", None)
    dtype = getattr(tokens, "dtype", None)
    if shape is None or dtype is None or len(shape) != 2:
        raise InvalidArgument(f"tokens must be a 2-D array (N_tok, dim), got shape {shape}", field="tokens")
    if not np.issubdtype(dtype, np.floating):
        raise InvalidArgument(f"tokens must be floating point, got {dtype}", field="tokens")
    n_tok, dim = int(shape[0]), int(shape[1])
    if n_tok == 0 or dim == 0:
        raise InvalidArgument(f"tokens must hold at least one vector of at least one dimension, got shape {shape}", field="tokens")
    return n_tok, dim


def _check_offsets(doc_offsets: np.ndarray | Sequence[int], n_tok: int) -> np.ndarray:
    offsets = np.asarray(doc_offsets)
    if offsets.ndim != 1 or offsets.shape[0] < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise InvalidArgument(
            f"doc_offsets must be a 1-D integer array of N_doc + 1 >= 2 entries, got {offsets.dtype} {offsets.shape}",
            field="doc_offsets",
        )
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != n_tok:
        raise InvalidArgument(
            f"doc_offsets must start at 0 and end at the {n_tok} token rows, got {offsets[0]} .. {offsets[-1]}",
            field="doc_offsets",
        )
    steps = np.diff(offsets)
    if (steps <= 0).any():
        doc = int(np.flatnonzero(steps <= 0)[0])
        raise InvalidArgument(
            f"doc_offsets must increase strictly (every document has at least one token): "
            f"document {doc} spans [{offsets[doc]}, {offsets[doc + 1]})",
            field="doc_offsets",
        )
    return offsets


def _check_ids(doc_ids: Sequence[str], n_doc: int) -> list[str]:
    ids = list(doc_ids)
    if len(ids) != n_doc:
        raise InvalidArgument(f"{len(ids)} doc_ids for {n_doc} documents in doc_offsets", field="doc_ids")
    for i, doc_id in enumerate(ids):
        if not isinstance(doc_id, str) or not doc_id.strip() or len(doc_id) > MAX_DOC_ID_CHARS:
            raise InvalidArgument(
                f"doc_ids[{i}] must be a non-empty string of at most {MAX_DOC_ID_CHARS} characters, got {doc_id!r}",
                field="doc_ids",
            )
    if (duplicate := first_duplicate(ids)) is not None:
        raise InvalidArgument(f"duplicate document id {duplicate!r} in doc_ids", field="doc_ids")
    return ids


def _check_per_document(values: Sequence[Any] | None, n_doc: int, field: str) -> list[Any] | None:
    if values is None:
        return None
    values = list(values)
    if len(values) != n_doc:
        raise InvalidArgument(f"{len(values)} {field} for {n_doc} documents", field=field)
    return values


def _blocks(offsets: np.ndarray, block_tokens: int) -> list[tuple[int, int]]:
    """Consecutive document ranges [first, last) of at most block_tokens tokens (one document
    per range at least, however long)."""
    n_doc = offsets.shape[0] - 1
    ranges, first = [], 0
    while first < n_doc:
        last = int(np.searchsorted(offsets, offsets[first] + block_tokens, side="right")) - 1
        last = min(n_doc, max(last, first + 1))
        ranges.append((first, last))
        first = last
    return ranges
