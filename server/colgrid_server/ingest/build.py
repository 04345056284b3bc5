"""Build one index version from a mixed stream of sources: text documents and page images.

Each refused input (a `SourceError` from ingestion, or an image the encoder cannot take) is
reported through `on_error` and skipped; the rest is indexed. Nothing is published unless at
least one document was written, and the version appears only once complete (VersionWriter).
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from colgrid_server.encoders.loading import encodes_images
from colgrid_server.errors import ColgridError, InvalidArgument
from colgrid_server.index import EncoderRef, VersionSummary, VersionWriter
from colgrid_server.index._pooling import check_pool_factor, pool_patches
from colgrid_server.ingest._types import ErrorCode, SourceError, SourceItem

TEXT_BATCH = 32
IMAGE_BATCH = 4
PAGE_FORMAT = ("WEBP", ".webp", {"quality": 90, "method": 4})  # ~2x smaller than PNG, for display


@dataclass(frozen=True)
class SourceBuildReport:
    summary: VersionSummary
    indexed: int
    errors: tuple[SourceError, ...]


def build_version_from_sources(
    sources: Iterable[SourceItem | SourceError],
    encoder: Any,
    final_dir: Path,
    *,
    build_params: Mapping[str, Any] | None = None,
    pool_factor: int = 1,
    keep_pages: bool = True,
    on_error: Callable[[SourceError], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress: bool = False,
) -> SourceBuildReport:
    """Encode and write every source (text through encode_documents, images through
    encode_images, pooled by pool_factor), then publish at final_dir.
    on_progress(seen, indexed) after each batch; on_error(error) for each refused input."""
    check_pool_factor(pool_factor)
    ref = EncoderRef(id=encoder.id, kind=encoder.kind, dim=int(encoder.dim))
    params = {**dict(build_params or {}), "pool_factor": pool_factor}
    errors: list[SourceError] = []
    seen = indexed = 0

    def refuse(error: SourceError) -> None:
        errors.append(error)
        if on_error is not None:
            on_error(error)

    with VersionWriter(Path(final_dir), encoder=ref, build_params=params) as writer, tqdm(
        desc="index documents", unit="doc", disable=not progress
    ) as bar:
        for batch in _batches(sources):
            seen += len(batch)
            items = []
            for source in batch:
                if isinstance(source, SourceError):
                    refuse(source)
                else:
                    items.append(source)
            texts = [item for item in items if item.kind == "text"]
            images = [item for item in items if item.kind == "image"]
            indexed += _write_texts(writer, encoder, texts, refuse)
            indexed += _write_images(writer, encoder, images, pool_factor, keep_pages, refuse)
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(seen, indexed)
        if indexed == 0:
            raise InvalidArgument(f"none of the {seen} inputs could be indexed"
                                  + (f" (first error: {errors[0].id}: {errors[0].reason})" if errors else ""),
                                  field="documents")
        summary = writer.finalize(progress=progress)
    return SourceBuildReport(summary=summary, indexed=indexed, errors=tuple(errors))


def _batches(sources: Iterable[SourceItem | SourceError]) -> Iterator[list[SourceItem | SourceError]]:
    iterator = iter(sources)
    while batch := list(islice(iterator, TEXT_BATCH)):
        yield batch


def _write_texts(writer: VersionWriter, encoder: Any, items: list[SourceItem], refuse: Callable[[SourceError], None]) -> int:
    if not items:
        return 0
    encoded = encoder.encode_documents([item.text for item in items])
    written = 0
    for item, enc in zip(items, encoded):
        try:
            writer.add(item.id, enc.vectors, np.asarray(enc.spans), item.text or "", item.metadata)
            written += 1
        except InvalidArgument as exc:
            refuse(_error(item, ErrorCode.INVALID_DOCUMENT, str(exc)))
    return written


def _write_images(writer: VersionWriter, encoder: Any, items: list[SourceItem], pool_factor: int, keep_pages: bool,
                  refuse: Callable[[SourceError], None]) -> int:
    if not items:
        return 0
    if not encodes_images(encoder):
        for item in items:
            refuse(_error(item, ErrorCode.UNSUPPORTED_BY_ENCODER,
                          f"is an image, but encoder {encoder.kind!r} encodes text only; build with a multimodal "
                          "encoder (ColQwen2, ColPali)"))
        return 0
    written = 0
    for start in range(0, len(items), IMAGE_BATCH):
        chunk = items[start:start + IMAGE_BATCH]
        for item, encoded in zip(chunk, _encode_images(encoder, chunk, refuse)):
            if encoded is None:
                continue
            pooled = pool_patches(encoded.vectors, pool_factor)
            meta = {**dict(item.metadata), "grid": list(encoded.grid), "width_px": encoded.size[0],
                    "height_px": encoded.size[1], "pooled_vectors": int(pooled.vectors.shape[0]),
                    "patches": int(encoded.vectors.shape[0])}
            try:
                writer.add_image(item.id, pooled.vectors, cells=encoded.patches, boxes=encoded.boxes,
                                 members=pooled.members, metadata=meta,
                                 page_image=_page_bytes(item) if keep_pages else None, page_suffix=PAGE_FORMAT[1])
                written += 1
            except InvalidArgument as exc:
                refuse(_error(item, ErrorCode.INVALID_DOCUMENT, str(exc)))
    return written


def _encode_images(encoder: Any, items: list[SourceItem], refuse: Callable[[SourceError], None]) -> list[Any]:
    """Encoded images in order, None where one failed: a batch that fails is retried one by one
    so a single bad image costs only itself."""
    try:
        return list(encoder.encode_images([item.image for item in items]))
    except ColgridError as exc:
        if len(items) > 1:
            return [result for item in items for result in _encode_images(encoder, [item], refuse)]
        refuse(_error(items[0], ErrorCode.CORRUPT_IMAGE, f"the encoder refused it: {exc}"))
        return [None]


def _page_bytes(item: SourceItem) -> bytes:
    buffer = io.BytesIO()
    pil_format, _suffix, options = PAGE_FORMAT
    item.image.save(buffer, format=pil_format, **options)  # type: ignore[union-attr]  # image items only
    return buffer.getvalue()


def _error(item: SourceItem, code: ErrorCode, reason: str) -> SourceError:
    return SourceError(id=item.id, path=str(item.metadata.get("source", item.id)), reason=reason, code=code)
