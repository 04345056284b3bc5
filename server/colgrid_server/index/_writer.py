"""VersionWriter: stream documents into a temporary Zarr group, then build centroids, codes,
inverted lists and the centroid graph, encode the tokens with the version's codec, write the
manifest last and publish with one rename."""
from __future__ import annotations

import math
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from colgrid_server.errors import FailedPrecondition, InvalidArgument
from colgrid_server.index import _format as F
from colgrid_server.index._centroids import build_graph, centroid_count, compute_dtype, nearest, spherical_kmeans
from colgrid_server.index._codec_writer import CodecWriter
from colgrid_server.index._codecs import RESIDUAL_FIT_SAMPLE, resolve_codec
from colgrid_server.index._format import EncoderRef, VersionSummary
from colgrid_server.index._manifest import fsync_dir, fsync_tree, write_manifest
from colgrid_server.index._validate import (
    check_spans,
    check_text,
    check_utf8,
    first_duplicate,
    json_or_invalid,
    metadata_json,
    no_spans,
    strings,
)
from colgrid_server.index._zarr_io import CHUNK_BYTES, WRITE_CONFIG, Appender, pow2_rows

DOC_CHUNK = 4096  # documents per chunk of the per-document string arrays
# k-means dominates finalize on CPU. On 5,000 stdlib docstrings (272k tokens, C = 8192), 4
# iterations over 16 tokens per centroid gave the same search recall as 10 over 32, 3x faster.
KMEANS_SAMPLE_PER_CENTROID = 16
KMEANS_ITERATIONS = 4
# A version whose every token norm is within this of 1 is "normalized" (fp16 rounding of a unit
# vector moves its norm by ~1e-3).
UNIT_NORM_TOLERANCE = 1e-2
ENTROPY_FIT_SAMPLE = 65536  # tokens the entropy codec's rotation and step are fitted on

_STRING = str  # zarr v3 "string" data type (vlen-utf8 codec)


class VersionWriter:
    """Writes one immutable index version. Use as a context manager: an exception inside the
    block removes the temporary directory and publishes nothing."""

    def __init__(
        self,
        final_dir: Path,
        *,
        encoder: EncoderRef,
        build_params: Mapping[str, Any] | None = None,
        normalized: bool | None = None,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """build_params["codec"] picks how tokens are stored (fp16 | int8 | residual4 |
        residual2, default fp16). normalized=True refuses tokens that are not unit vectors;
        None records whether they all were. extra_attrs are added to zarr.json."""
        self.final_dir = Path(final_dir)
        self.encoder = encoder
        self.build_params = dict(build_params or {})
        json_or_invalid(self.build_params, "build_params")
        self.codec = resolve_codec(self.build_params)
        self.normalized = normalized
        self.extra_attrs = dict(extra_attrs or {})
        json_or_invalid(self.extra_attrs, "attrs")
        self._refuse_existing()
        self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.final_dir.parent / f".{self.final_dir.name}.tmp-{secrets.token_hex(6)}"
        self._started = time.monotonic()
        self._state = "open"
        self._ids: set[str] = set()
        self._lengths: list[int] = []
        self._n_tokens = 0
        self._norm_range = (math.inf, 0.0)
        self._has_spans = False
        self._patch_counts: list[np.ndarray] = []  # per document; zeros for text documents
        self._patch_cells: Appender | None = None  # created with the first image document
        self._patch_boxes: Appender | None = None
        self.tmp_dir.mkdir()
        try:
            self._group = zarr.open_group(str(self.tmp_dir), mode="w-", zarr_format=3)
            dim = encoder.dim
            token_rows = pow2_rows(CHUNK_BYTES // (2 * dim))
            self._tokens = Appender(self._array(F.TOKENS, (0, dim), "float16", (token_rows, dim), compressors=None))
            self._spans = Appender(self._array(F.TOKEN_SPANS, (0, 2), "int32", (pow2_rows(CHUNK_BYTES // 8), 2)))
            self._doc_ids = Appender(self._array(F.DOC_IDS, (0,), _STRING, (DOC_CHUNK,)))
            self._texts = Appender(self._array(F.TEXTS, (0,), _STRING, (DOC_CHUNK,)))
            self._metadata = Appender(self._array(F.METADATA, (0,), _STRING, (DOC_CHUNK,)))
        except BaseException:
            self.abort()
            raise

    # -- writing -----------------------------------------------------------------------------

    def add(
        self,
        doc_id: str,
        vectors: np.ndarray,
        spans: np.ndarray | None = None,
        text: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one document: vectors (n, dim) float, spans (n, 2) int character offsets
        [start, end) into text, or (-1, -1) for a token with no span. Without spans (vectors
        computed elsewhere) the text is optional."""
        self._require_open()
        if not isinstance(doc_id, str) or not doc_id:
            raise InvalidArgument("document id must be a non-empty string", field="id")
        if doc_id in self._ids:
            raise InvalidArgument(f"duplicate document id {doc_id!r}", field="id")
        vectors16 = self._check_vectors(doc_id, vectors)
        if spans is None:
            spans32 = no_spans(vectors16.shape[0])
            check_text(doc_id, text, required=False)
        else:
            spans32 = check_spans(doc_id, spans, vectors16.shape[0], text)
        meta = metadata_json(doc_id, metadata)
        check_utf8(doc_id, text)
        self._ids.add(doc_id)
        self._has_spans |= spans is not None
        self._append([doc_id], vectors16, np.array([vectors16.shape[0]]), spans32, [text], [meta])

    def add_image(
        self,
        doc_id: str,
        vectors: np.ndarray,
        *,
        cells: np.ndarray,
        boxes: np.ndarray,
        members: Sequence[np.ndarray] | None = None,
        metadata: Mapping[str, Any] | None = None,
        page_image: bytes | None = None,
        page_suffix: str = ".png",
    ) -> None:
        """Append one image document (a page): vectors (m, dim); cells (n, 2) and boxes (n, 4)
        of its n patches; members[i] the patch indices vector i stands for (None: one patch
        per vector, m == n). page_image: the encoded page, kept in the version for explanations."""
        self._require_open()
        if not isinstance(doc_id, str) or not doc_id:
            raise InvalidArgument("document id must be a non-empty string", field="id")
        if doc_id in self._ids:
            raise InvalidArgument(f"duplicate document id {doc_id!r}", field="id")
        vectors16 = self._check_vectors(doc_id, vectors)
        cells32, boxes32 = np.asarray(cells, dtype=np.int32), np.asarray(boxes, dtype=np.int32)
        n_patches = cells32.shape[0] if cells32.ndim == 2 else -1
        if cells32.shape != (n_patches, 2) or boxes32.shape != (n_patches, 4) or n_patches < 1:
            raise InvalidArgument(f"document {doc_id!r}: cells must be (n, 2) and boxes (n, 4) for its n patches",
                                  field="patches")
        if members is None:
            members = [np.array([i]) for i in range(vectors16.shape[0])]
        if len(members) != vectors16.shape[0]:
            raise InvalidArgument(f"document {doc_id!r}: {len(members)} member lists for {vectors16.shape[0]} vectors",
                                  field="patches")
        order = np.concatenate([np.asarray(m, dtype=np.int64) for m in members])
        if order.size != n_patches or np.any(np.sort(order) != np.arange(n_patches)):
            raise InvalidArgument(f"document {doc_id!r}: every patch must belong to exactly one vector", field="patches")
        meta = dict(metadata or {})
        meta["kind"] = "image"
        if page_image is not None:
            if page_suffix not in (".png", ".jpg", ".webp"):
                raise InvalidArgument(f"page images are stored as .png, .jpg or .webp, not {page_suffix!r}",
                                      field="page_image")
            pages = self.tmp_dir / F.PAGES_DIR
            pages.mkdir(exist_ok=True)
            name = f"{F.PAGES_DIR}/{len(self._lengths):08d}{page_suffix}"
            (self.tmp_dir / name).write_bytes(page_image)
            meta["page_image"] = name
        meta_json = metadata_json(doc_id, meta)
        if self._patch_cells is None:
            self._patch_cells = Appender(self._array(F.PATCH_CELLS, (0, 2), "int32", (pow2_rows(CHUNK_BYTES // 8), 2)))
            self._patch_boxes = Appender(self._array(F.PATCH_BOXES, (0, 4), "int32", (pow2_rows(CHUNK_BYTES // 16), 4)))
        self._ids.add(doc_id)
        self._patch_cells.append(cells32[order])
        self._patch_boxes.append(boxes32[order])  # type: ignore[union-attr]  # created with cells
        counts = np.array([len(m) for m in members], dtype=np.uint16)
        self._append([doc_id], vectors16, np.array([vectors16.shape[0]]), no_spans(vectors16.shape[0]), [""],
                     [meta_json], patch_counts=counts)

    def add_block(
        self,
        doc_ids: Sequence[str],
        vectors: np.ndarray,
        lengths: np.ndarray,
        *,
        texts: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Append consecutive documents with no token spans: document i owns the next
        lengths[i] rows of vectors (sum(lengths), dim). texts and metadata: one per document."""
        self._require_open()
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (len(doc_ids),) or np.any(lengths <= 0) or int(lengths.sum()) != np.shape(vectors)[0]:
            raise InvalidArgument(
                f"a block of {len(doc_ids)} documents needs as many positive lengths summing to its "
                f"{np.shape(vectors)[0]} vectors", field="doc_offsets",
            )  # fmt: skip
        texts = [""] * len(doc_ids) if texts is None else list(texts)
        metadata = [None] * len(doc_ids) if metadata is None else list(metadata)
        for doc_id in doc_ids:
            if not isinstance(doc_id, str) or not doc_id:
                raise InvalidArgument(f"document ids must be non-empty strings, got {doc_id!r}", field="doc_ids")
        if (duplicate := first_duplicate(doc_ids, self._ids)) is not None:
            raise InvalidArgument(f"duplicate document id {duplicate!r}", field="doc_ids")
        vectors16 = self._check_vectors(None, vectors, lengths=lengths, doc_ids=doc_ids)
        for doc_id, text in zip(doc_ids, texts):
            check_text(doc_id, text, required=False)
            check_utf8(doc_id, text)
        metas = [metadata_json(doc_id, meta) for doc_id, meta in zip(doc_ids, metadata)]
        self._ids.update(doc_ids)
        self._append(list(doc_ids), vectors16, lengths, no_spans(vectors16.shape[0]), texts, metas)

    def _append(
        self, doc_ids: list[str], vectors16: np.ndarray, lengths: np.ndarray, spans32: np.ndarray, texts: list[str],
        metas: list[str], *, patch_counts: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self._patch_counts.append(np.zeros(vectors16.shape[0], np.uint16) if patch_counts is None else patch_counts)
        self._lengths.extend(int(n) for n in lengths)
        self._n_tokens += vectors16.shape[0]
        self._tokens.append(vectors16)
        self._spans.append(spans32)
        self._doc_ids.append(strings(doc_ids))
        self._texts.append(strings(texts))
        self._metadata.append(strings(metas))

    def _check_vectors(
        self, doc_id: str | None, vectors: np.ndarray, *, lengths: np.ndarray | None = None, doc_ids: Sequence[str] = ()
    ) -> np.ndarray:
        """float16 copy of vectors; errors name the document (doc_id, or the block's document
        owning the first bad row)."""
        vectors = np.asarray(vectors)
        dim = self.encoder.dim
        field = "vectors" if lengths is None else "tokens"

        def where(row: int) -> str:
            if lengths is None:
                return f"document {doc_id!r}"
            doc = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
            return f"document {doc_ids[doc]!r} (token row {row} of the block)"

        if vectors.ndim != 2 or vectors.shape[1] != dim or vectors.shape[0] == 0:
            who = f"document {doc_id!r}: vectors" if lengths is None else "tokens"
            raise InvalidArgument(f"{who} have shape {vectors.shape}, expected (n >= 1, {dim})", field=field)
        if not np.issubdtype(vectors.dtype, np.floating):
            who = f"document {doc_id!r}: vectors" if lengths is None else "tokens"
            raise InvalidArgument(f"{who} must be floating point, got {vectors.dtype}", field=field)
        with np.errstate(over="ignore", invalid="ignore"):
            vectors16 = vectors.astype(np.float16)
        finite = np.isfinite(vectors16).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise InvalidArgument(
                f"{where(row)}: vectors contain NaN, infinity or values beyond the float16 range", field=field
            )
        wide = vectors16.astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        if self.normalized:
            off = np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE
            if off.any():
                row = int(np.flatnonzero(off)[0])
                raise InvalidArgument(
                    f"{where(row)}: a token has norm {norms[row]:.4f}, but the vectors were declared normalized "
                    f"(unit L2 norm); normalise them or declare normalized=False",
                    field="normalized",
                )
        low, high = self._norm_range
        self._norm_range = (min(low, float(norms.min())), max(high, float(norms.max())))
        return vectors16

    # -- publishing --------------------------------------------------------------------------

    def finalize(self, progress: bool = False) -> VersionSummary:
        """Build centroids, codes, inverted lists and graph; write the manifest; publish."""
        self._require_open()
        try:
            return self._finalize(progress)
        except BaseException:
            self.abort()
            raise

    def _finalize(self, progress: bool) -> VersionSummary:
        for appender in (self._tokens, self._spans, self._doc_ids, self._texts, self._metadata,
                         self._patch_cells, self._patch_boxes):
            if appender is not None:
                appender.flush()
        has_patches = self._patch_cells is not None
        if has_patches:
            counts = np.concatenate(self._patch_counts)
            self._write(F.TOKEN_PATCH_COUNTS, counts, chunk=pow2_rows(CHUNK_BYTES // 2))
        n_docs, n_tokens = len(self._lengths), self._n_tokens
        if n_docs == 0:
            raise InvalidArgument("an index version needs at least one document", field="documents")
        offsets = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(np.asarray(self._lengths, dtype=np.int64), out=offsets[1:])
        self._write(F.DOC_OFFSETS, offsets, chunk=pow2_rows(CHUNK_BYTES // 8))

        params = self._resolved_params(n_tokens)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        low, high = self._norm_range
        unit = abs(low - 1.0) <= UNIT_NORM_TOLERANCE and abs(high - 1.0) <= UNIT_NORM_TOLERANCE
        codec = CodecWriter(self.codec, self.encoder.dim, self._array, renormalize=unit)
        centroids, codes = self._cluster(params, device, codec, progress)
        codec_attrs = codec.finish()
        if self.codec.name != "fp16":
            del self._group[F.TOKENS]  # the staged float16 copy: the codec's arrays replace it
        self._write(F.CENTROIDS, centroids, chunk=pow2_rows(CHUNK_BYTES // (4 * self.encoder.dim)))
        self._write(F.TOKEN_CODES, codes, chunk=pow2_rows(CHUNK_BYTES // 4))
        ivf_offsets, ivf_docs = _inverted_lists(codes, offsets, centroids.shape[0])
        self._write(F.IVF_OFFSETS, ivf_offsets, chunk=pow2_rows(CHUNK_BYTES // 8))
        self._write(F.IVF_DOCS, ivf_docs, chunk=pow2_rows(CHUNK_BYTES // 4))
        graph = np.frombuffer(build_graph(centroids, seed=params["seed"]), dtype=np.uint8)
        self._write(F.CENTROID_HNSW, graph, chunk=CHUNK_BYTES)

        self._group.attrs.update(
            {
                **self.extra_attrs,
                "format_version": F.FORMAT_VERSION,
                "encoder": self.encoder.to_dict(),
                "counts": {"documents": n_docs, "tokens": n_tokens, "centroids": int(centroids.shape[0]), "postings": int(ivf_docs.shape[0])},
                "build_params": params,
                "codec": codec_attrs,
                "normalized": unit if self.normalized is None else self.normalized,
                "token_norms": {"min": low, "max": high},
                "token_spans": self._has_spans,
                "patches": has_patches,
            }
        )
        fsync_tree(self.tmp_dir)
        manifest_sha = write_manifest(self.tmp_dir)
        self._refuse_existing()
        # Rename publishes atomically; a crash before it leaves only the hidden tmp directory.
        os.rename(self.tmp_dir, self.final_dir)
        fsync_dir(self.final_dir.parent)
        self._state = "published"
        return VersionSummary(
            path=self.final_dir,
            documents=n_docs,
            tokens=n_tokens,
            centroids=int(centroids.shape[0]),
            dim=self.encoder.dim,
            manifest_sha256=manifest_sha,
            build_seconds=time.monotonic() - self._started,
            codec=self.codec.name,
            encoder=self.encoder,
        )

    def _resolved_params(self, n_tokens: int) -> dict[str, Any]:
        """build_params with every knob the build used filled in (recorded in zarr.json)."""
        params = dict(self.build_params)
        n_centroids = int(params.get("n_centroids") or centroid_count(n_tokens))
        if n_centroids <= 0:
            raise InvalidArgument("build parameter n_centroids must be positive", field="build_params")
        params["n_centroids"] = min(n_centroids, n_tokens)
        params.setdefault("kmeans_iterations", KMEANS_ITERATIONS)
        params.setdefault("kmeans_sample", min(n_tokens, KMEANS_SAMPLE_PER_CENTROID * params["n_centroids"]))
        params["kmeans_sample"] = max(params["n_centroids"], min(n_tokens, int(params["kmeans_sample"])))
        params.setdefault("seed", 0)
        params["codec"] = self.codec.name
        return params

    def _cluster(
        self, params: dict[str, Any], device: torch.device, codec: CodecWriter, progress: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """k-means over a token sample; then one pass over the staged tokens, a chunk at a time:
        the nearest centroid of every token and the codec's encoding of it."""
        n_tokens = self._n_tokens
        rng = np.random.default_rng(params["seed"])
        sample_rows = np.sort(rng.choice(n_tokens, size=params["kmeans_sample"], replace=False))
        sample = torch.from_numpy(self._gather_rows(sample_rows)).to(device=device, dtype=torch.float32)
        centroids = spherical_kmeans(
            sample, params["n_centroids"], iterations=int(params["kmeans_iterations"]), seed=int(params["seed"])
        )
        centroids_t = centroids.T.to(compute_dtype(device)).contiguous()
        centroids_np = centroids.cpu().numpy().astype(np.float32)
        if codec.needs_fit:
            fit = self._fit_sample(codec, sample, sample_rows, rng).to(device)
            codec.fit(fit.cpu().numpy(), nearest(fit, centroids_t).cpu().numpy(), centroids_np, total_tokens=n_tokens)
        del sample
        codes = np.empty(n_tokens, dtype=np.uint16 if centroids_np.shape[0] <= 1 << 16 else np.int32)
        tokens = self._tokens.array
        step = tokens.chunks[0]
        bar = tqdm(total=n_tokens, desc="assign tokens", unit="tok", disable=not progress)
        for start in range(0, n_tokens, step):
            block = tokens[start : start + step]
            block_codes = nearest(torch.from_numpy(block).to(device), centroids_t).cpu().numpy()
            codes[start : start + step] = block_codes
            codec.encode(block, block_codes, centroids_np)
            bar.update(block.shape[0])
        bar.close()
        return centroids_np, codes

    def _fit_sample(self, codec: CodecWriter, sample: torch.Tensor, sample_rows: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Tokens the codec fits on. The entropy codec sets its step from its estimated size,
        which tokens the centroids were fitted on would underestimate (they sit closer to
        their centroids): it takes tokens outside the k-means sample when there are enough."""
        if codec.codec.is_entropy and self._n_tokens - sample_rows.shape[0] >= ENTROPY_FIT_SAMPLE // 4:
            outside = np.setdiff1d(np.arange(self._n_tokens), sample_rows, assume_unique=True)
            rows = np.sort(rng.choice(outside, size=min(ENTROPY_FIT_SAMPLE, outside.shape[0]), replace=False))
            return torch.from_numpy(self._gather_rows(rows)).to(torch.float32)
        return sample[torch.from_numpy(rng.permutation(sample.shape[0])[:RESIDUAL_FIT_SAMPLE]).to(sample.device)]

    def _gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """tokens[rows] for sorted rows, reading one chunk at a time (never the whole array)."""
        tokens = self._tokens.array
        step = tokens.chunks[0]
        out = np.empty((rows.shape[0], tokens.shape[1]), dtype=np.float16)
        chunk_of = rows // step
        bounds = np.searchsorted(chunk_of, np.arange(0, math.ceil(tokens.shape[0] / step) + 1))
        for chunk, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                block = tokens[chunk * step : (chunk + 1) * step]
                out[lo:hi] = block[rows[lo:hi] - chunk * step]
        return out

    # -- housekeeping ------------------------------------------------------------------------

    def abort(self) -> None:
        """Discard everything written; nothing is published."""
        if self._state != "published":
            self._state = "aborted"
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None or self._state == "open":
            self.abort()

    def _require_open(self) -> None:
        if self._state != "open":
            raise FailedPrecondition(f"version writer for {self.final_dir} is {self._state}")

    def _refuse_existing(self) -> None:
        if self.final_dir.exists():
            raise FailedPrecondition(
                f"index version {self.final_dir} already exists; published versions are immutable, build a new version"
            )

    def _array(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], **kwargs: Any) -> zarr.Array:
        return self._group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, config=WRITE_CONFIG, **kwargs)

    def _write(self, name: str, values: np.ndarray, *, chunk: int) -> None:
        chunks = (max(1, min(chunk, values.shape[0])),) + values.shape[1:]
        array = self._array(name, values.shape, values.dtype, chunks)
        array[...] = values


def _inverted_lists(codes: np.ndarray, offsets: np.ndarray, n_centroids: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR centroid -> ascending unique indices of the documents with a token in that centroid."""
    n_docs = offsets.shape[0] - 1
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int64), np.diff(offsets))
    pairs = np.unique(codes.astype(np.int64) * n_docs + doc_of_token)
    ivf_offsets = np.zeros(n_centroids + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // n_docs, minlength=n_centroids), out=ivf_offsets[1:])
    return ivf_offsets, (pairs % n_docs).astype(np.int32)
