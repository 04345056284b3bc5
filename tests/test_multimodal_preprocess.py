"""Serve-time image preprocessing (numpy + Pillow) against the Hugging Face Qwen2-VL processor.

Measured tolerance (documented in image_preprocess.py, recorded per export in encoder.json):
float32 rounding (< 1e-5) when no resize is needed; at most about one grey level after
normalisation (0.0150 on these images: 1/255 / std 0.26) when Pillow's bicubic resize stands in
for torchvision's.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize
from transformers.vision_utils import get_vision_position_ids

from colgrid_server.encoders import ImageSpec
from colgrid_server.encoders._qwen2_vl_positions import vision_positions
from colgrid_server.encoders.image_preprocess import (patch_boxes, patch_cells, prepare_image, smart_resize)
from colgrid_server.errors import InvalidArgument

MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 64
RESIZE_TOLERANCE = 0.02  # measured 0.0150: one grey level / std
EXACT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def processor() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def spec(processor: Qwen2VLImageProcessor) -> ImageSpec:
    return ImageSpec(prompt="<|image_pad|>", prompt_ids=(7,), image_token="<|image_pad|>", image_token_id=7,
                     resize="smart", patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=MIN_PIXELS,
                     max_pixels=MAX_PIXELS, mean=tuple(processor.image_mean), std=tuple(processor.image_std))


def _page(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _theirs(processor: Qwen2VLImageProcessor, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    batch = processor(images=[image], return_tensors="pt")
    _, h, w = batch["image_grid_thw"][0].tolist()
    return batch["pixel_values"].numpy(), (h, w)


@pytest.mark.parametrize("size", [(84, 56), (56, 224), (224, 224)])
def test_pixels_match_the_processor_when_no_resize_is_needed(processor, spec, size) -> None:
    image = _page(*size)
    ours = prepare_image(image, spec)
    theirs, grid = _theirs(processor, image)
    assert ours.grid == grid and ours.resized == size
    assert np.abs(ours.pixels - theirs).max() < EXACT_TOLERANCE


@pytest.mark.parametrize("size", [(97, 211), (403, 134), (1000, 1000), (30, 20)])
def test_resized_pixels_match_the_processor_within_one_grey_level(processor, spec, size) -> None:
    image = _page(*size, seed=1)
    ours = prepare_image(image, spec)
    theirs, grid = _theirs(processor, image)
    assert ours.grid == grid
    assert ours.pixels.shape == theirs.shape
    assert np.abs(ours.pixels - theirs).max() <= RESIZE_TOLERANCE


def test_non_rgb_images_are_converted_as_the_processor_sees_them(processor, spec) -> None:
    gray = _page(84, 56).convert("L")
    ours = prepare_image(gray, spec)
    theirs, _ = _theirs(processor, gray.convert("RGB"))  # colpali-engine converts before processing
    assert np.abs(ours.pixels - theirs).max() < EXACT_TOLERANCE


@pytest.mark.parametrize("height,width", [(56, 84), (1, 1), (10_000, 60), (333, 777), (4000, 3000)])
def test_smart_resize_matches_transformers(height: int, width: int) -> None:
    assert smart_resize(height, width, 28, MIN_PIXELS, MAX_PIXELS) == hf_smart_resize(
        height, width, 28, MIN_PIXELS, MAX_PIXELS)


def test_images_flatter_than_200_to_1_are_refused(spec) -> None:
    with pytest.raises(InvalidArgument, match="aspect ratio"):
        prepare_image(Image.new("RGB", (4020, 20)), spec)


@pytest.mark.parametrize("grid", [(4, 6), (8, 4), (12, 18)])
def test_vision_positions_match_transformers(grid: tuple[int, int]) -> None:
    theirs = get_vision_position_ids(torch.tensor([[1, *grid]]), 2).numpy()
    assert np.array_equal(vision_positions(*grid, merge=2), theirs)


def test_patch_cells_are_row_major() -> None:
    cells = patch_cells(2, 3)
    assert cells.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_patch_boxes_tile_the_original_image() -> None:
    boxes = patch_boxes(rows=7, cols=5, width=333, height=250)
    x0, y0, x1, y1 = boxes.T
    assert (x0.min(), y0.min(), x1.max(), y1.max()) == (0, 0, 333, 250)
    assert np.all(x1 > x0) and np.all(y1 > y0)
    assert int(((x1 - x0) * (y1 - y0)).sum()) == 333 * 250  # no gaps, no overlaps
