"""Image files (PNG, JPEG, TIFF, WebP) -> one RGB page each; multi-page TIFFs -> one per frame.

Sizes are checked from the header, before any pixel is decoded, so a decompression bomb costs a
few bytes of reading. Decoding happens once per frame and the result is independent of the file.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from colgrid_server.ingest._types import ErrorCode, SourceError, SourceItem

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp"})
# Pillow's format names; MPO is the multi-picture JPEG many cameras write (its first frame is a JPEG).
_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "TIFF": "image/tiff", "WEBP": "image/webp"}
_HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def iter_image(path: Path, doc_id: str, rel: str, *, max_pixels: int) -> Iterator[SourceItem | SourceError]:
    """Every frame of a TIFF is a page (scanners write multi-page TIFFs as documents); other
    formats yield their first frame only (an animated WebP is not a document)."""
    def error(code: ErrorCode, reason: str, frame_id: str = doc_id) -> SourceError:
        return SourceError(id=frame_id, path=str(path), reason=reason, code=code)

    try:
        opened = Image.open(path)  # parses the header; pixels stay on disk
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice Image.MAX_IMAGE_PIXELS
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "its size"
        yield error(ErrorCode.IMAGE_TOO_LARGE, f"{size} is over max_image_pixels={max_pixels:,} "
                    f"(and Pillow's decompression-bomb limit); refused from its header, before decoding")
        return
    except FileNotFoundError as exc:
        yield error(ErrorCode.UNREADABLE, f"cannot read the file: {exc.strerror}")
        return
    except PermissionError as exc:
        yield error(ErrorCode.UNREADABLE, f"cannot read the file: {exc.strerror}")
        return
    except Exception as exc:  # Pillow raises UnidentifiedImageError, SyntaxError, struct.error, ...
        # Pillow names the file it read; that may be a server-side spool path: never show it.
        detail = str(exc).replace(repr(str(path)), "it").replace(str(path), "it")
        yield error(ErrorCode.CORRUPT_IMAGE, f"not a readable PNG, JPEG, TIFF or WebP image ({detail})")
        return
    with opened as image:
        if image.format not in _FORMATS:
            yield error(ErrorCode.UNSUPPORTED_TYPE, f"is a {image.format} image; supported: PNG, JPEG, TIFF, WebP")
            return
        try:
            frames = image.n_frames if image.format == "TIFF" else 1
        except Exception as exc:  # counting TIFF frames walks the IFD chain, which can be broken
            yield error(ErrorCode.CORRUPT_IMAGE, f"cannot read its TIFF page directory ({exc})")
            return
        for index in range(frames):
            frame_id = f"{doc_id}#p{index + 1}" if frames > 1 else doc_id
            item = _frame(image, index, frames, frame_id, rel, max_pixels, error)
            yield item
            del item  # hold no page beyond what the caller keeps while the next one decodes


def _frame(image: Image.Image, index: int, frames: int, frame_id: str, rel: str, max_pixels: int,
           error) -> SourceItem | SourceError:
    try:
        if index:
            image.seek(index)
        width, height = image.size
        if width * height > max_pixels:
            return error(ErrorCode.IMAGE_TOO_LARGE, f"{width}x{height} = {width * height:,} pixels is over "
                         f"max_image_pixels={max_pixels:,}; downscale it first", frame_id)
        rgb = to_rgb(ImageOps.exif_transpose(image))  # phone scans carry their rotation in EXIF
    except MemoryError:
        raise
    except Exception as exc:  # truncated data, bad CRC, broken compression stream: this frame's fault
        return error(ErrorCode.CORRUPT_IMAGE, f"cannot be decoded ({exc})", frame_id)
    metadata = {"source": rel, "mime": _FORMATS[image.format], "width_px": rgb.width, "height_px": rgb.height}
    if frames > 1:
        metadata.update(page=index + 1, page_count=frames)
    return SourceItem(id=frame_id, kind="image", text=None, image=rgb, metadata=metadata)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, as the encoders and the page-image store expect. Transparency is flattened onto
    white (Pillow's plain RGB conversion would turn transparent areas black); 16-bit and float
    greyscale is scaled to 8 bits rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH:
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in image.mode or "a" in image.mode or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
