"""A batch of prepared images -> the image graph's inputs, per model family, in numpy.

Each builder returns the feeds and, per image, the output rows (positions in the padded token
sequence) that hold its patch vectors, in row-major grid order.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from colgrid_server.encoders._prompt_tokenize import pad_sequences
from colgrid_server.encoders._qwen2_vl_positions import rope_positions, vision_positions
from colgrid_server.encoders.image_preprocess import PreparedImage
from colgrid_server.encoders.spec import ImageSpec

Feeds = dict[str, np.ndarray]


def _expand_prompt(spec: ImageSpec, n_image_tokens: int) -> tuple[np.ndarray, int, int]:
    """The prompt's ids with its image placeholder repeated; and the counts before and after."""
    ids = np.asarray(spec.prompt_ids, dtype=np.int64)
    at = int(np.flatnonzero(ids == spec.image_token_id)[0])
    expanded = np.concatenate([ids[:at], np.full(n_image_tokens, spec.image_token_id, dtype=np.int64), ids[at + 1:]])
    return expanded, at, len(ids) - at - 1


def qwen2_vl_feeds(images: Sequence[PreparedImage], spec: ImageSpec, pad_id: int,
                   padding_side: str) -> tuple[Feeds, list[np.ndarray]]:
    merge = spec.merge_size
    rows, positions = [], []
    for image in images:
        grid_rows, grid_cols = image.grid[0] // merge, image.grid[1] // merge
        ids, before, after = _expand_prompt(spec, grid_rows * grid_cols)
        rows.append(ids)
        positions.append(rope_positions(before, grid_rows, grid_cols, after))
    input_ids, starts = pad_sequences(rows, pad_id, padding_side)
    batch, length = input_ids.shape
    attention = np.zeros((batch, length), dtype=np.int64)
    position_ids = np.zeros((3, batch, length), dtype=np.int64)  # padding keeps position 0, as in PyTorch
    for i, (row, pos) in enumerate(zip(rows, positions)):
        attention[i, starts[i]:starts[i] + len(row)] = 1
        position_ids[:, i, starts[i]:starts[i] + len(row)] = pos
    n_patches = max(len(image.pixels) for image in images)
    width = images[0].pixels.shape[1]
    pixel_values = np.zeros((batch, n_patches, width), dtype=np.float32)
    patch_positions = np.zeros((batch, n_patches, 2), dtype=np.int64)
    patch_mask = np.zeros((batch, n_patches), dtype=np.int64)
    for i, image in enumerate(images):
        n = len(image.pixels)
        pixel_values[i, :n] = image.pixels
        patch_positions[i, :n] = vision_positions(image.grid[0], image.grid[1], merge)
        patch_mask[i, :n] = 1
    image_rows = [np.flatnonzero(input_ids[i] == spec.image_token_id) for i in range(batch)]
    feeds = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids,
             "pixel_values": pixel_values, "patch_positions": patch_positions, "patch_mask": patch_mask}
    return feeds, image_rows


def paligemma_feeds(images: Sequence[PreparedImage], spec: ImageSpec, pad_id: int,
                    padding_side: str) -> tuple[Feeds, list[np.ndarray]]:
    """Fixed-size images: the prompt's image run is one token per patch; token_type_ids 0 mark
    the image + prompt prefix that PaliGemma attends to bidirectionally."""
    rows, types = [], []
    prompt_types = np.asarray(spec.prompt_type_ids or [0] * len(spec.prompt_ids), dtype=np.int64)
    for image in images:
        n = (image.grid[0] // spec.merge_size) * (image.grid[1] // spec.merge_size)
        ids, before, _ = _expand_prompt(spec, n)
        rows.append(ids)
        types.append(np.concatenate([prompt_types[:before], np.full(n, prompt_types[before]),
                                     prompt_types[before + 1:]]))
    input_ids, starts = pad_sequences(rows, pad_id, padding_side)
    token_type_ids, _ = pad_sequences(types, 0, padding_side)
    attention, _ = pad_sequences([np.ones(len(r), dtype=np.int64) for r in rows], 0, padding_side)
    feeds = {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": token_type_ids,
             "pixel_values": np.stack([image.pixels for image in images]).astype(np.float32)}
    image_rows = [np.flatnonzero(input_ids[i] == spec.image_token_id) for i in range(len(images))]
    return feeds, image_rows


FEED_BUILDERS = {"colqwen2": qwen2_vl_feeds, "colpali": paligemma_feeds}
