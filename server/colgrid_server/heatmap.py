"""Patch-level heatmaps: where on a page a query matched, in numpy and Pillow only.

    patch_scores(query_vectors, patch_vectors, token=None, *, combine="max") -> (n,) float32
    normalize_scores(scores, value_range=None)                             -> (n,) float32 in [0, 1]
    heat_array(size, boxes, scores, *, value_range=None, smooth=True)     -> (H, W) float32 in [0, 1]
    render_heatmap(image, boxes, scores, *, alpha=0.5, colormap="mako", ...) -> PIL RGB image

One query token (`token=i`) gives exactly colpali-engine's similarity map for that token
(`get_similarity_maps_from_embeddings(...)[i]`, the dot product of the token with every patch,
flattened row-major). For the whole query (`token=None`) `combine` chooses:

    "max"     each patch's best similarity to any query token (default): a dense map in which a
              patch is hot when some token of the query found it relevant
    "sum"     the sum over query tokens of their similarity to the patch (dense; tokens that match
              everything, such as ColQwen2's padding suffix, flatten it)
    "maxsim"  each patch's share of the MaxSim score: the sum of the maxima of the tokens whose
              best patch it is (0 elsewhere); the scores add up to the document's MaxSim score

Rendering follows colpali-engine's `plot_similarity_map`: scores are min-max normalised (with
its epsilon), the patch grid is upsampled bicubically to the page, colour-mapped ("mako" by
default, as there) and blended over the page with `alpha`. Boxes that do not form a regular grid
(e.g. pooled patches covering several cells) are painted exactly instead (no smoothing).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from colgrid_server.errors import InvalidArgument

Combine = Literal["max", "sum", "maxsim"]
EPSILON = 1e-10  # colpali-engine's normalize_similarity_map adds this to the range

# 17 evenly spaced stops of each 256-entry table, interpolated linearly (max error 3/255 for
# mako, 6/255 for viridis). mako: seaborn's (BSD-3), colpali-engine's choice; viridis: matplotlib's.
_STOPS = {
    "mako": ((11, 4, 5), (28, 16, 28), (43, 28, 53), (55, 40, 79), (62, 53, 107), (65, 67, 135),
             (59, 86, 152), (54, 105, 159), (53, 123, 163), (52, 140, 167), (53, 158, 170), (59, 175, 173),
             (73, 193, 173), (104, 209, 173), (150, 221, 181), (190, 232, 202), (222, 245, 229)),
    "viridis": ((68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
                (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 159, 136), (39, 173, 129), (61, 188, 116),
                (92, 200, 99), (129, 211, 77), (170, 220, 50), (213, 226, 26), (253, 231, 37)),
}
COLORMAPS = tuple(sorted(_STOPS))


def colormap_table(name: str) -> np.ndarray:
    """uint8 (256, 3): the colour for each heat level 0..255."""
    if name not in _STOPS:
        raise InvalidArgument(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}", field="colormap")
    stops = np.asarray(_STOPS[name], dtype=np.float64)
    at = np.linspace(0.0, 255.0, len(stops))
    levels = np.arange(256, dtype=np.float64)
    table = np.stack([np.interp(levels, at, stops[:, c]) for c in range(3)], axis=1)
    return np.rint(table).astype(np.uint8)


# ------------------------------------------------------------------------------------ scores

def patch_scores(query_vectors: np.ndarray, patch_vectors: np.ndarray, token: int | None = None, *,
                 combine: Combine = "max") -> np.ndarray:
    """float32 (n,): one score per patch row of `patch_vectors` (n, dim) for `query_vectors`
    (q, dim). `token`: one query token's similarities (0-based; negative counts from the end);
    None: all tokens, reduced by `combine` (see the module docstring)."""
    query = _matrix(query_vectors, "query_vectors")
    patches = _matrix(patch_vectors, "patch_vectors")
    if query.shape[1] != patches.shape[1]:
        raise InvalidArgument(f"query vectors have dim {query.shape[1]} but patch vectors dim {patches.shape[1]}",
                              field="patch_vectors")
    if token is not None:
        if not -len(query) <= token < len(query):
            raise InvalidArgument(f"token {token} is out of range for a query of {len(query)} tokens", field="token")
        return patches @ query[token]
    sims = query @ patches.T  # (q, n), float32 as MaxSim scores it
    if combine == "max":
        return sims.max(axis=0)
    if combine == "sum":
        return sims.sum(axis=0, dtype=np.float32)
    if combine == "maxsim":
        best = sims.argmax(axis=1)
        scores = np.zeros(len(patches), dtype=np.float32)
        np.add.at(scores, best, sims[np.arange(len(query)), best])
        return scores
    raise InvalidArgument(f"combine must be 'max', 'sum' or 'maxsim', got {combine!r}", field="combine")


def normalize_scores(scores: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(scores - lo) / (hi - lo + 1e-10), clipped to [0, 1]; lo, hi = min and max of `scores`
    unless `value_range` fixes them (e.g. one range for all tokens of a query, so maps compare)."""
    values = _scores(scores, None)
    lo, hi = (float(values.min()), float(values.max())) if value_range is None else map(float, value_range)
    if not hi >= lo:
        raise InvalidArgument(f"value_range must be (low, high) with low <= high, got {value_range}",
                              field="value_range")
    return np.clip((values - np.float32(lo)) / np.float32(hi - lo + EPSILON), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------- heat

def heat_array(size: tuple[int, int], boxes: np.ndarray, scores: np.ndarray, *,
               value_range: tuple[float, float] | None = None, smooth: bool = True) -> np.ndarray:
    """float32 (height, width) in [0, 1]: normalised patch scores spread over their pixel boxes
    (x0, y0, x1, y1, end-exclusive) on a page of `size` = (width, height). Pixels no box covers
    are 0; where boxes overlap the higher score shows."""
    width, height = _size(size)
    boxes = _boxes(boxes, width, height)
    levels = normalize_scores(_scores(scores, len(boxes)), value_range)
    xs = np.unique(boxes[:, [0, 2]])
    ys = np.unique(boxes[:, [1, 3]])
    cells = np.full((len(ys) - 1, len(xs) - 1), np.nan, dtype=np.float32)
    c0, c1 = np.searchsorted(xs, boxes[:, 0]), np.searchsorted(xs, boxes[:, 2])
    r0, r1 = np.searchsorted(ys, boxes[:, 1]), np.searchsorted(ys, boxes[:, 3])
    single = (c1 - c0 == 1) & (r1 - r0 == 1)
    np.fmax.at(cells, (r0[single], c0[single]), levels[single])
    for i in np.flatnonzero(~single):  # pooled or irregular boxes span several cells
        region = cells[r0[i]:r1[i], c0[i]:c1[i]]
        np.fmax(region, levels[i], out=region)
    if smooth and _regular_tiling(xs, ys, width, height) and not np.isnan(cells).any():
        # colpali-engine's upsampling: the patch grid resized bicubically to the page
        grid = Image.fromarray(cells, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        return np.clip(np.asarray(grid, dtype=np.float32), 0.0, 1.0)
    cells = np.nan_to_num(cells, nan=0.0)
    col = np.searchsorted(xs, np.arange(width), side="right") - 1
    row = np.searchsorted(ys, np.arange(height), side="right") - 1
    inside_x = (col >= 0) & (col < cells.shape[1])
    inside_y = (row >= 0) & (row < cells.shape[0])
    heat = cells[np.clip(row, 0, cells.shape[0] - 1)][:, np.clip(col, 0, cells.shape[1] - 1)]
    heat[~inside_y, :] = 0.0
    heat[:, ~inside_x] = 0.0
    return heat


def render_heatmap(image: Image.Image, boxes: np.ndarray, scores: np.ndarray, *, alpha: float = 0.5,
                   colormap: str = "mako", value_range: tuple[float, float] | None = None, smooth: bool = True,
                   boxes_size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image of `image`'s size: the colour-mapped heat of `scores` over `boxes` blended
    onto the page, `alpha` of heat to 1 - alpha of page. `boxes_size`: (width, height) the boxes
    are measured on when `image` is a resized copy of that page (default: `image.size`)."""
    if not isinstance(image, Image.Image):
        raise InvalidArgument(f"image must be a PIL image, got {type(image).__name__}", field="image")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"alpha must be between 0 and 1, got {alpha}", field="alpha")
    table = colormap_table(colormap)
    boxes = np.asarray(boxes)
    if boxes_size is not None and tuple(boxes_size) != image.size:
        boxes = _rescale_boxes(boxes, _size(boxes_size), image.size)
    heat = heat_array(image.size, boxes, scores, value_range=value_range, smooth=smooth)
    colours = Image.fromarray(np.rint(heat * 255).astype(np.uint8), mode="L")
    colours.putpalette(table.tobytes())  # heat level -> colour in C, not a numpy gather
    return Image.blend(image.convert("RGB"), colours.convert("RGB"), alpha)


# ---------------------------------------------------------------------------------- helpers

def _matrix(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise InvalidArgument(f"{name} must be a non-empty (rows, dim) array, got shape {array.shape}", field=name)
    return array


def _scores(scores: np.ndarray, n: int | None) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float32)
    if values.ndim != 1 or values.size == 0 or (n is not None and len(values) != n):
        expected = f"({n},)" if n is not None else "(n,) with n >= 1"
        raise InvalidArgument(f"scores must have shape {expected}, got {values.shape}", field="scores")
    if not np.isfinite(values).all():
        raise InvalidArgument("scores must be finite (no NaN or infinity)", field="scores")
    return values


def _size(size: Sequence[int]) -> tuple[int, int]:
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise InvalidArgument(f"size must be (width, height) of at least 1 pixel, got {tuple(size)}", field="size")
    return width, height


def _boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    array = np.asarray(boxes)
    if array.ndim != 2 or array.shape[1] != 4 or array.shape[0] == 0:
        raise InvalidArgument(f"boxes must be a non-empty (n, 4) array of x0, y0, x1, y1, got shape {array.shape}",
                              field="boxes")
    array = array.astype(np.int64)
    x0, y0, x1, y1 = array.T
    if (x0 < 0).any() or (y0 < 0).any() or (x1 > width).any() or (y1 > height).any() or (x1 <= x0).any() \
            or (y1 <= y0).any():
        raise InvalidArgument(f"every box must be non-empty and inside the {width}x{height} page", field="boxes")
    return array


def _regular_tiling(xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> bool:
    """Edges that cover the whole page in cells of equal size (to the pixel rounding that
    `patch_boxes` does), so resizing the grid lands each cell on its own box."""
    def even(edges: np.ndarray, extent: int) -> bool:
        steps = np.diff(edges)
        return edges[0] == 0 and edges[-1] == extent and int(steps.max() - steps.min()) <= 1
    return even(xs, width) and even(ys, height)


def _rescale_boxes(boxes: np.ndarray, source: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    scale = np.array([target[0] / source[0], target[1] / source[1]] * 2)
    scaled = np.rint(np.asarray(boxes, dtype=np.float64) * scale).astype(np.int64)
    return np.clip(scaled, 0, np.array([target[0], target[1]] * 2))
