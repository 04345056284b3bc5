"""Page images -> the pixel arrays and patch geometry the image graphs take, in numpy and Pillow.

Serving never imports torch or transformers: this re-does, as recorded in `encoder.json`, what
the checkpoint's Hugging Face processor does (convert to RGB, resize, rescale, normalise, and for
Qwen2-VL cut into patches in merge-block order, each repeated over the temporal patch).

Pixel values match the Hugging Face processor to float32 rounding when no resize is needed.
When resizing, Pillow's filter differs from torchvision's by about one grey level at most (the
figure each export measures is in `encoder.json`: image.parity.preprocess_max_abs_diff).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from colgrid_server.encoders.spec import ImageSpec
from colgrid_server.errors import InvalidArgument

_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
            "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
MAX_ASPECT_RATIO = 200  # Qwen2-VL's processor refuses flatter images


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the image graph.

    pixels: float32, (n_patches, channels * temporal * patch * patch) in merge-block order for
    patch-sequence models (Qwen2-VL), or (channels, height, width) for fixed-size models (SigLIP).
    grid: (rows, cols) of model patches before merging. size: (width, height) of the original
    image; resized: (width, height) the model saw.
    """

    pixels: np.ndarray
    grid: tuple[int, int]
    size: tuple[int, int]
    resized: tuple[int, int]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) with both sides multiples of `factor`, area within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible: Qwen2-VL's rule, rounding included (Python's round)."""
    if height < 1 or width < 1:
        raise InvalidArgument(f"image has no pixels ({width}x{height})", field="image")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidArgument(f"image aspect ratio {max(height, width) / min(height, width):.0f}:1 is over "
                              f"{MAX_ASPECT_RATIO}:1; crop or split it", field="image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_size(spec: ImageSpec, width: int, height: int) -> tuple[int, int]:
    """(width, height) the model sees for an image of `width` x `height`."""
    if spec.resize == "fixed":
        if width < 1 or height < 1:
            raise InvalidArgument(f"image has no pixels ({width}x{height})", field="image")
        return spec.width, spec.height
    h, w = smart_resize(height, width, spec.patch_size * spec.merge_size, spec.min_pixels, spec.max_pixels)
    return w, h


def normalized_pixels(image: Image.Image, spec: ImageSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """float32 (3, height, width) at the model's size, rescaled and normalised; and that size."""
    rgb = image.convert("RGB")  # as colpali-engine's process_images does, before the processor
    width, height = model_size(spec, *rgb.size)
    if (width, height) != rgb.size:
        rgb = rgb.resize((width, height), resample=_FILTERS[spec.resample])
    pixels = np.asarray(rgb, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1)
    # Same float32 arithmetic as the processor's fused rescale + normalise: (x - mean/s) / (std/s).
    scale = 1.0 / spec.rescale_factor
    mean = (np.asarray(spec.mean, dtype=np.float32) * np.float32(scale)).reshape(3, 1, 1)
    std = (np.asarray(spec.std, dtype=np.float32) * np.float32(scale)).reshape(3, 1, 1)
    return (pixels - mean) / std, (width, height)


def patchify(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """(3, H, W) -> (rows * cols, 3 * temporal * patch * patch), patches in merge-block order: the
    merge x merge patches that become one token are consecutive, blocks in row-major order."""
    channels, height, width = pixels.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    rows, cols = height // p, width // p
    blocks = pixels.reshape(channels, rows // m, m, p, cols // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # An image is a clip of `t` identical frames: repeat along a new temporal axis after channels.
    clip = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    return np.ascontiguousarray(clip.reshape(rows * cols, channels * t * p * p), dtype=np.float32)


def prepare_image(image: Image.Image, spec: ImageSpec) -> PreparedImage:
    if not isinstance(image, Image.Image):
        raise InvalidArgument(f"expected a PIL image, got {type(image).__name__}", field="image")
    pixels, resized = normalized_pixels(image, spec)
    rows, cols = resized[1] // spec.patch_size, resized[0] // spec.patch_size
    if spec.resize == "smart":
        pixels = patchify(pixels, spec)
    return PreparedImage(pixels=pixels, grid=(rows, cols), size=image.size, resized=resized)


def merged_grid(prepared: PreparedImage, spec: ImageSpec) -> tuple[int, int]:
    """(rows, cols) of output vectors: the patch grid after merge x merge blocks become one."""
    return prepared.grid[0] // spec.merge_size, prepared.grid[1] // spec.merge_size


def patch_cells(rows: int, cols: int) -> np.ndarray:
    """int32 (rows * cols, 2): (row, col) of each output vector, row-major."""
    r, c = np.divmod(np.arange(rows * cols, dtype=np.int32), cols)
    return np.stack([r, c], axis=1).astype(np.int32)


def patch_boxes(rows: int, cols: int, width: int, height: int) -> np.ndarray:
    """int32 (rows * cols, 4): each cell's (x0, y0, x1, y1) on the ORIGINAL image, end-exclusive.

    The resize scales the whole image uniformly onto the grid, so cell (r, c) covers
    [c * width / cols, (c + 1) * width / cols) horizontally; rounding both edges the same way
    makes neighbouring boxes tile the image exactly, without gaps or overlaps."""
    xs = np.rint(np.arange(cols + 1) * (width / cols)).astype(np.int32)
    ys = np.rint(np.arange(rows + 1) * (height / rows)).astype(np.int32)
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1).astype(np.int32)
