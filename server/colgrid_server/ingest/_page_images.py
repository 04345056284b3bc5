"""Keep rendered pages on disk so search hits and heatmaps can show them later."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

from colgrid_server.errors import InvalidArgument
from colgrid_server.ingest._types import SourceItem

PageImageFormat = Literal["png", "webp"]
# PNG keeps the exact pixels the encoder saw; WebP (lossy, quality 90) is ~2x smaller for display.
_SAVE_OPTIONS = {"png": ("PNG", {}), "webp": ("WEBP", {"quality": 90, "method": 4})}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def page_image_name(item_id: str, format: PageImageFormat = "png") -> str:
    """A flat, filesystem-safe file name for a document id: readable prefix + id hash (so ids
    that differ only in unsafe characters never collide)."""
    if format not in _SAVE_OPTIONS:
        raise InvalidArgument(f"page image format must be one of {sorted(_SAVE_OPTIONS)}, got {format!r}",
                              field="format")
    slug = _UNSAFE.sub("_", item_id).strip("._")[:80] or "page"
    digest = hashlib.sha256(item_id.encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}.{format}"


def save_page_image(item: SourceItem, directory: str | Path, *, format: PageImageFormat = "png") -> Path:
    """Write `item.image` to `directory / page_image_name(item.id)` atomically (temporary file,
    fsync, rename): a reader never sees half a file, and a crash leaves the old file or none.
    Returns the path written; record `path.relative_to(directory)` as the page's `page_image`."""
    if item.image is None:
        raise InvalidArgument(f"source {item.id!r} is text; it has no page image", field="item")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / page_image_name(item.id, format)
    pil_format, options = _SAVE_OPTIONS[format]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            item.image.save(fh, format=pil_format, **options)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
