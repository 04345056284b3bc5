"""Qwen2-VL's data-dependent positions, in numpy, outside the graph.

The exported image graph takes these as inputs: computed inside it they bake grid sizes in as
constants (trace exporter) or fail on `.tolist()` (dynamo). Ports of transformers'
`get_vision_position_ids` and `Qwen2VLModel.get_rope_index` for one image per sequence.
"""
from __future__ import annotations

import numpy as np


def vision_positions(rows: int, cols: int, merge: int) -> np.ndarray:
    """int64 (rows * cols, 2): (row, col) of each patch in merge-block order, for the vision
    encoder's 2-D rotary embedding."""
    h, w = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    shape = (rows // merge, merge, cols // merge, merge)
    h = h.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    w = w.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([h, w], axis=1).astype(np.int64)


def rope_positions(before: int, merged_rows: int, merged_cols: int, after: int) -> np.ndarray:
    """int64 (3, n): the language model's M-RoPE (temporal, height, width) positions of a sequence
    of `before` text tokens, one image of merged_rows x merged_cols tokens, `after` text tokens.

    Text advances all three by one per token; the image's tokens sit at (start, start + row,
    start + col); text after it resumes at start + max(rows, cols)."""
    text_before = np.broadcast_to(np.arange(before), (3, before))
    start = before
    r, c = np.divmod(np.arange(merged_rows * merged_cols), merged_cols)
    image = np.stack([np.full_like(r, start), start + r, start + c])
    resume = start + max(merged_rows, merged_cols)
    text_after = np.broadcast_to(resume + np.arange(after), (3, after))
    return np.concatenate([text_before, image, text_after], axis=1).astype(np.int64)
