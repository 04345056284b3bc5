"""Opening a published version: check the manifest, then load every array into memory in the
layout the search kernels use."""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import hnswlib
import numpy as np
import torch
import zarr

from colgrid_server.errors import CorruptVersion, FailedPrecondition, NotFound
from colgrid_server.index import _format as F
from colgrid_server.index._centroids import load_graph
from colgrid_server.index._format import EncoderRef
from colgrid_server.index._manifest import read_manifest, verify_files
from colgrid_server.index._stores import DenseTokens, TokenStore
from colgrid_server.index._token_loader import TokenLoader

HNSW_EF = 64  # search breadth over the centroid graph (0.998 centroid recall at nprobe 4 on real text); hnswlib uses max(ef, k)


def version_exists(path: Path) -> bool:
    """True once a version is complete (published with its manifest); says nothing of integrity."""
    return (Path(path) / F.MANIFEST_NAME).is_file()


def verify_version(path: Path) -> str:
    """Check every file against the manifest; return the manifest's sha256 or raise CorruptVersion."""
    root = _existing_dir(Path(path))
    files, manifest_sha = read_manifest(root)
    verify_files(root, files, hashes=True)
    return manifest_sha


def open_version(
    path: Path, *, verify: bool = True, device: str | None = None, keep_codes: bool = False, screen: bool = False
) -> LoadedVersion:
    """Load a published version. verify=True checks every file's sha256 against the manifest
    (verify=False still requires the manifest and checks the file list and sizes).
    keep_codes: for a compressed version (int8, residual), keep the codes resident and decode
    each query's candidates (less memory); by default decode once at load into float16. Entropy
    versions always decode at load (their blocks decode only whole).
    screen: also keep an int8 copy of the tokens (`Int8Screen`, 1 byte per value: x1.5 the
    float16 tokens) that CPU searches rank candidates with before scoring the few that can
    reach the top k exactly, ~2x faster than the bf16 pass. Ignored where no search would read
    it: on a GPU, and with keep_codes."""
    root = _existing_dir(Path(path))
    files, manifest_sha = read_manifest(root)
    verify_files(root, files, hashes=verify)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        group = zarr.open_group(str(root), mode="r", zarr_format=3)
        attrs = dict(group.attrs)
        encoder = _encoder(root, attrs)
        codec = _codec(root, attrs)
        names = F.ARRAY_NAMES + F.CODEC_ARRAYS[codec["name"]] + (F.PATCH_ARRAYS if attrs.get("patches") else ())
        arrays = {name: _array(root, group, name) for name in names}
    except CorruptVersion:
        raise
    except Exception as exc:  # zarr raises a variety of errors for unreadable metadata
        raise _corrupt(root, f"cannot be read as a Zarr v3 group ({exc})") from exc
    _check_chunks_present(root, arrays, set(files))
    loader = _Loader(root, arrays, encoder.dim)
    version = loader.load(attrs, encoder, codec, target, manifest_sha, keep_codes=keep_codes)
    if screen and target.type == "cpu" and isinstance(version.store, DenseTokens):
        version.store = version.store.with_screen(version.doc_offsets)
    return version


class LoadedVersion:
    """One version held in memory, read-only. Safe to share between threads; `close()` drops the
    arrays once no search uses them any more (the caller drains in-flight requests first)."""

    def __init__(self, **fields: Any) -> None:
        self.path: Path = fields["path"]
        self.name: str = self.path.name
        self.encoder: EncoderRef = fields["encoder"]
        self.attrs: Mapping[str, Any] = fields["attrs"]
        self.device: torch.device = fields["device"]
        self.manifest_sha256: str = fields["manifest_sha256"]
        self.documents: int = fields["documents"]
        self.tokens_count: int = fields["tokens_count"]
        self.store: TokenStore = fields["store"]  # the token vectors in the kernel's layout
        self.doc_offsets: np.ndarray = fields["doc_offsets"]  # int64 (N_doc + 1)
        self.doc_ids: list[str] = fields["doc_ids"]
        self.texts: list[str] = fields["texts"]
        self.spans: np.ndarray = fields["spans"]  # int32 (N_tok, 2); a read-only (-1, -1) view when none were stored
        self.centroids: np.ndarray = fields["centroids"]  # float32 (C, dim)
        self.token_codes: np.ndarray = fields["token_codes"]  # uint16 or int32 (N_tok,)
        self.ivf_offsets: np.ndarray = fields["ivf_offsets"]  # int64 (C + 1)
        self.ivf_docs: np.ndarray = fields["ivf_docs"]  # int32, unique docs per centroid
        self.graph: hnswlib.Index = fields["graph"]
        self._metadata_json: list[str] = fields["metadata_json"]
        # Image documents: token t stands for patches patch_offsets[t]:patch_offsets[t + 1] of
        # patch_cells / patch_boxes (none for text tokens). None: a text-only version.
        self.patch_offsets: np.ndarray | None = fields.get("patch_offsets")
        self.patch_cells: np.ndarray | None = fields.get("patch_cells")
        self.patch_boxes: np.ndarray | None = fields.get("patch_boxes")
        self._closed = False
        self._close_hooks: list[Callable[[], None]] = []

    @property
    def codec(self) -> str:
        """How the version stores its tokens: fp16, int8, residual4, residual2, entropy4 or entropy2."""
        return self.store.codec

    @property
    def normalized(self) -> bool:
        """Whether the version's vectors are unit L2 norm (declared, or observed at build)."""
        return bool(self.attrs.get("normalized", False))

    @property
    def tokens(self) -> torch.Tensor:
        """(N_tok, dim) float16 on device: the stored values (fp16), or the decoded ones (a
        compressed version loaded without keep_codes)."""
        if not isinstance(self.store, DenseTokens):
            raise FailedPrecondition(
                f"index version {self.name} keeps its {self.codec} codes resident; read tokens with store.gather or store.decode"
            )
        return self.store.tokens

    @property
    def max_token_norm(self) -> float:
        return self.store.max_norm

    @property
    def centroid_count(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the arrays (tokens dominate)."""
        arrays = (self.doc_offsets, self.centroids, self.token_codes, self.ivf_offsets, self.ivf_docs)
        spans = self.spans.nbytes if self.spans.strides[0] else 0  # a broadcast view holds nothing
        texts = sum(len(t) for t in self.texts) if not self._closed else 0
        return self.store.nbytes + sum(a.nbytes for a in arrays) + spans + texts

    @property
    def has_images(self) -> bool:
        return self.patch_offsets is not None

    def is_image(self, doc_index: int) -> bool:
        """Whether the document is an image (page): its tokens stand for patches."""
        if self.patch_offsets is None:
            return False
        first = int(self.doc_offsets[doc_index])
        return bool(self.patch_offsets[first + 1] > self.patch_offsets[first])

    def token_patches(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        """(cells (k, 2), boxes (k, 4)) of the patches global token `token` stands for, nearest
        first; empty for a text token."""
        if self.patch_offsets is None or self.patch_cells is None or self.patch_boxes is None:
            return np.empty((0, 2), np.int32), np.empty((0, 4), np.int32)
        lo, hi = int(self.patch_offsets[token]), int(self.patch_offsets[token + 1])
        return self.patch_cells[lo:hi], self.patch_boxes[lo:hi]

    def page_image_path(self, doc_index: int) -> Path | None:
        """The stored page image of an image document (None when it was not kept)."""
        name = self.metadata(doc_index).get("page_image")
        if not isinstance(name, str) or not name.startswith(F.PAGES_DIR + "/") or ".." in name:
            return None
        return self.path / name

    @property
    def metadata_json(self) -> list[str]:
        """Every document's metadata as stored (one JSON object text per document)."""
        self.require_open()
        return self._metadata_json

    def metadata(self, doc_index: int) -> dict[str, Any]:
        """The document's metadata object (parsed on demand: only hits need it)."""
        self.require_open()
        return json.loads(self._metadata_json[doc_index])

    def require_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"index version {self.name} has been unloaded")

    def on_close(self, hook: Callable[[], None]) -> None:
        """Call `hook` once when the version is closed (e.g. to unpin its cached copy)."""
        self._close_hooks.append(hook)

    def close(self) -> None:
        """Release the memory. Searches started afterwards raise FailedPrecondition."""
        self._closed = True
        hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            hook()
        empty = np.empty(0)
        self.store.close()
        self.doc_ids, self.texts, self._metadata_json = [], [], []
        self.spans = self.centroids = self.token_codes = self.ivf_docs = empty
        self.patch_offsets = self.patch_cells = self.patch_boxes = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        return (
            f"LoadedVersion({self.name!r}, documents={self.documents}, tokens={self.tokens_count}, "
            f"codec={self.codec}, device={self.device})"
        )


class _Loader:
    """Reads and cross-checks the arrays; every inconsistency is a CorruptVersion naming it."""

    def __init__(self, root: Path, arrays: dict[str, zarr.Array], dim: int) -> None:
        self.root, self.arrays, self.dim = root, arrays, dim

    def load(
        self, attrs: dict[str, Any], encoder: EncoderRef, codec: dict[str, Any], device: torch.device, manifest_sha: str,
        *, keep_codes: bool,
    ) -> LoadedVersion:  # fmt: skip
        a = self.arrays
        n_tok, n_doc, n_cent = a[F.TOKEN_CODES].shape[0], a[F.DOC_IDS].shape[0], a[F.CENTROIDS].shape[0]
        counts = attrs.get("counts") or {}
        if (counts.get("documents"), counts.get("tokens"), counts.get("centroids")) != (n_doc, n_tok, n_cent):
            self.fail(f"counts in zarr.json {counts} do not match the arrays ({n_doc} documents, {n_tok} tokens, {n_cent} centroids)")
        tokens = TokenLoader(a, self.read, self.fail, n_tok=n_tok, dim=self.dim, device=device)
        for name, (shape, dtype) in tokens.shapes(codec).items():
            self.expect(name, shape, dtype)
        self.expect(F.DOC_OFFSETS, (n_doc + 1,), np.int64)
        self.expect(F.TOKEN_SPANS, (n_tok, 2), np.int32)
        self.expect(F.TEXTS, (n_doc,), None)
        self.expect(F.METADATA, (n_doc,), None)
        self.expect(F.CENTROIDS, (n_cent, self.dim), np.float32)
        code_dtype = np.uint16 if attrs["format_version"] >= 2 and n_cent <= 1 << 16 else np.int32
        self.expect(F.TOKEN_CODES, (n_tok,), code_dtype)
        self.expect(F.IVF_OFFSETS, (n_cent + 1,), np.int64)

        offsets = self.read(F.DOC_OFFSETS)
        if n_doc == 0 or offsets[0] != 0 or offsets[-1] != n_tok or np.any(np.diff(offsets) <= 0):
            self.fail("doc_offsets is not a CSR index with at least one token per document")
        codes = self.read(F.TOKEN_CODES)
        if codes.size and (codes.min() < 0 or codes.max() >= n_cent):
            self.fail("token_codes refers to a centroid that does not exist")
        ivf_offsets, ivf_docs = self.read(F.IVF_OFFSETS), self.read(F.IVF_DOCS)
        if ivf_offsets[0] != 0 or ivf_offsets[-1] != ivf_docs.shape[0] or np.any(np.diff(ivf_offsets) < 0):
            self.fail("ivf_offsets is not a CSR index over ivf_docs")
        if ivf_docs.size and (ivf_docs.min() < 0 or ivf_docs.max() >= n_doc):
            self.fail("ivf_docs refers to a document that does not exist")
        centroids = self.read(F.CENTROIDS)
        if not np.isfinite(centroids).all():
            self.fail("centroids hold NaN or infinity")
        norms = attrs.get("token_norms")
        max_input_norm = float(norms["max"]) if isinstance(norms, Mapping) and "max" in norms else None
        store = tokens.load(codec, codes, centroids, keep_codes=keep_codes, max_input_norm=max_input_norm)
        try:
            graph = load_graph(self.read(F.CENTROID_HNSW).tobytes(), dim=self.dim, count=n_cent, ef=HNSW_EF)
        except RuntimeError as exc:
            self.fail(f"centroid_hnsw is not a readable hnswlib graph ({exc})")
        if graph.get_current_count() != n_cent:
            self.fail(f"centroid_hnsw holds {graph.get_current_count()} centroids, expected {n_cent}")
        patches = self._patches(n_tok) if attrs.get("patches") else {}
        if attrs.get("token_spans", True):
            spans = self.read(F.TOKEN_SPANS)
        else:  # no spans were stored (vectors computed elsewhere): a view that holds no memory
            spans = np.broadcast_to(np.array([-1, -1], dtype=np.int32), (n_tok, 2))
        return LoadedVersion(
            path=self.root,
            encoder=encoder,
            attrs=attrs,
            device=device,
            manifest_sha256=manifest_sha,
            documents=n_doc,
            tokens_count=n_tok,
            store=store,
            doc_offsets=offsets,
            doc_ids=self.read(F.DOC_IDS).tolist(),
            texts=self.read(F.TEXTS).tolist(),
            metadata_json=self.read(F.METADATA).tolist(),
            spans=spans,
            centroids=centroids,
            token_codes=codes,
            ivf_offsets=ivf_offsets,
            ivf_docs=ivf_docs,
            graph=graph,
            **patches,
        )

    def _patches(self, n_tok: int) -> dict[str, np.ndarray]:
        self.expect(F.TOKEN_PATCH_COUNTS, (n_tok,), np.uint16)
        counts = self.read(F.TOKEN_PATCH_COUNTS)
        offsets = np.zeros(n_tok + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        n_cells = int(offsets[-1])
        self.expect(F.PATCH_CELLS, (n_cells, 2), np.int32)
        self.expect(F.PATCH_BOXES, (n_cells, 4), np.int32)
        cells, boxes = self.read(F.PATCH_CELLS), self.read(F.PATCH_BOXES)
        if n_cells and (cells.min() < 0 or np.any(boxes[:, 2] <= boxes[:, 0]) or np.any(boxes[:, 3] <= boxes[:, 1])):
            self.fail("patch_cells / patch_boxes hold a negative cell or an empty box")
        return {"patch_offsets": offsets, "patch_cells": cells, "patch_boxes": boxes}

    def read(self, name: str, selection: Any = Ellipsis) -> np.ndarray:
        try:
            return self.arrays[name][selection]
        except Exception as exc:
            self.fail(f"array {name} cannot be read ({type(exc).__name__}: {exc})")

    def expect(self, name: str, shape: tuple[int, ...], dtype: type | None) -> None:
        array = self.arrays[name]
        if array.shape != shape or (dtype is not None and array.dtype != np.dtype(dtype)):
            self.fail(f"array {name} has shape {array.shape} and dtype {array.dtype}, expected {shape} {np.dtype(dtype) if dtype else ''}")

    def fail(self, what: str) -> NoReturn:
        raise _corrupt(self.root, what)


def _array(root: Path, group: zarr.Group, name: str) -> zarr.Array:
    try:
        node = group[name]
    except KeyError:
        raise _corrupt(root, f"array {name} is missing") from None
    if not isinstance(node, zarr.Array):
        raise _corrupt(root, f"{name} is not an array")
    return node


def _check_chunks_present(root: Path, arrays: dict[str, zarr.Array], files: set[str]) -> None:
    """Zarr reads an absent chunk as fill values; an absent chunk here is corruption."""
    for name, array in arrays.items():
        grid = [math.ceil(n / c) for n, c in zip(array.shape, array.chunks)]
        for index in itertools.product(*(range(g) for g in grid)):
            key = f"{name}/c/" + "/".join(map(str, index))
            if key not in files:
                raise _corrupt(root, f"chunk {key} of array {name} is missing")


def _encoder(root: Path, attrs: Mapping[str, Any]) -> EncoderRef:
    if attrs.get("format_version") not in F.READABLE_FORMAT_VERSIONS:
        raise _corrupt(root, f"format_version {attrs.get('format_version')!r} is not one of {F.READABLE_FORMAT_VERSIONS}")
    try:
        return EncoderRef.from_dict(attrs["encoder"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(root, "zarr.json has no valid encoder {id, kind, dim}") from exc


def _codec(root: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """zarr.json's codec entry; format version 1 predates codecs (fp16)."""
    codec = attrs.get("codec", {"name": "fp16"}) if attrs["format_version"] >= 2 else {"name": "fp16"}
    if not isinstance(codec, Mapping) or codec.get("name") not in F.CODECS:
        raise _corrupt(root, f"zarr.json names an unknown codec {codec!r}")
    for family in ("residual", "entropy"):
        if codec["name"].startswith(family) and codec.get("nbits") != int(codec["name"][len(family) :]):
            raise _corrupt(root, f"zarr.json codec {codec!r} does not match its bit width")
    if codec["name"].startswith("entropy"):
        step, rows, escape = codec.get("step"), codec.get("block_rows"), codec.get("escape_quotient")
        if not (isinstance(step, float) and math.isfinite(step) and step > 0):
            raise _corrupt(root, f"zarr.json codec {codec!r} has no positive finite step")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 24 for v in (rows, escape)):
            raise _corrupt(root, f"zarr.json codec {codec!r} needs positive integers block_rows and escape_quotient")
    return dict(codec)


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise NotFound(f"index version {path} does not exist", resource_type="index version", resource_name=str(path))
    return path


def _corrupt(root: Path, what: str) -> CorruptVersion:
    return CorruptVersion(f"index version {root}: {what}", version_path=str(root))
