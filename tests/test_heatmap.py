"""Heatmaps: patch scores as colpali-engine defines them, spread over pixel boxes, blended on the page.

The reference for one token's map and for normalisation is colpali-engine itself
(`colpali_engine/interpretability/similarity_map_utils.py`); the viridis table is checked against
matplotlib's. Rendering itself imports neither.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from colgrid_server.encoders.image_preprocess import patch_boxes
from colgrid_server.errors import InvalidArgument
from colgrid_server.heatmap import (colormap_table, heat_array, normalize_scores, patch_scores,
                                    render_heatmap)

ROWS, COLS, DIM = 6, 5, 16


def _colpali_similarity_map_utils():
    """colpali-engine's similarity_map_utils module, loaded from its file: the package's
    __init__ also imports its plotting module, which needs seaborn (not installed here)."""
    import colpali_engine

    path = Path(colpali_engine.__file__).parent / "interpretability" / "similarity_map_utils.py"
    spec = importlib.util.spec_from_file_location("colpali_similarity_map_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colpali_maps = _colpali_similarity_map_utils()


def _unit(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    vectors = rng.normal(size=shape).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture()
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return _unit(rng, (4, DIM)), _unit(rng, (ROWS * COLS, DIM))


# ------------------------------------------------------------------------------- scores

def test_one_token_is_colpali_engines_similarity_map(vectors) -> None:
    query, patches = vectors
    maps = colpali_maps.get_similarity_maps_from_embeddings(
        image_embeddings=torch.from_numpy(patches)[None], query_embeddings=torch.from_numpy(query)[None],
        n_patches=(COLS, ROWS), image_mask=torch.ones(1, ROWS * COLS, dtype=torch.bool))[0]  # (q, x, y)
    for token in range(len(query)):
        ours = patch_scores(query, patches, token).reshape(ROWS, COLS)
        np.testing.assert_allclose(ours, maps[token].numpy().T, atol=1e-6)


def test_normalisation_is_colpali_engines(vectors) -> None:
    query, patches = vectors
    scores = patch_scores(query, patches, 1)
    reference = colpali_maps.normalize_similarity_map(torch.from_numpy(scores.reshape(ROWS, COLS))).numpy().ravel()
    np.testing.assert_allclose(normalize_scores(scores), reference, atol=1e-6)


def test_a_shared_value_range_keeps_maps_comparable() -> None:
    np.testing.assert_allclose(normalize_scores(np.array([0.2, 0.4]), value_range=(0.0, 0.8)), [0.25, 0.5],
                               atol=1e-6)
    assert normalize_scores(np.array([-1.0, 2.0]), value_range=(0.0, 1.0)).tolist() == [0.0, 1.0]  # clipped


def test_all_tokens_max_is_each_patchs_best_token(vectors) -> None:
    query, patches = vectors
    expected = [max(float(q @ p) for q in query) for p in patches]
    np.testing.assert_allclose(patch_scores(query, patches), expected, atol=1e-6)


def test_all_tokens_sum_adds_every_tokens_similarity(vectors) -> None:
    query, patches = vectors
    expected = [sum(float(q @ p) for q in query) for p in patches]
    np.testing.assert_allclose(patch_scores(query, patches, combine="sum"), expected, atol=1e-5)


def test_maxsim_shares_add_up_to_the_maxsim_score(vectors) -> None:
    query, patches = vectors
    shares = patch_scores(query, patches, combine="maxsim")
    sims = query @ patches.T
    assert shares.sum() == pytest.approx(float(sims.max(axis=1).sum()), abs=1e-5)
    assert set(np.flatnonzero(shares)) == set(sims.argmax(axis=1))


def test_bad_score_requests_are_invalid_arguments(vectors) -> None:
    query, patches = vectors
    with pytest.raises(InvalidArgument) as err:
        patch_scores(query, patches, token=len(query))
    assert err.value.field == "token"
    with pytest.raises(InvalidArgument):
        patch_scores(query[:, :8], patches)
    with pytest.raises(InvalidArgument):
        patch_scores(query, patches, combine="mean")


# --------------------------------------------------------------------------------- heat

def test_unsmoothed_heat_is_each_boxs_level_exactly() -> None:
    boxes = patch_boxes(ROWS, COLS, 333, 250)
    scores = np.random.default_rng(1).normal(size=ROWS * COLS)
    heat = heat_array((333, 250), boxes, scores, smooth=False)
    levels = normalize_scores(scores)
    assert heat.shape == (250, 333)
    for (x0, y0, x1, y1), level in zip(boxes, levels):
        assert np.all(heat[y0:y1, x0:x1] == level)


def test_smoothed_heat_passes_through_each_box_centre() -> None:
    boxes = patch_boxes(ROWS, COLS, 448, 448)
    scores = np.random.default_rng(2).normal(size=ROWS * COLS)
    heat = heat_array((448, 448), boxes, scores)
    centres = np.array([heat[(y0 + y1) // 2, (x0 + x1) // 2] for x0, y0, x1, y1 in boxes])
    np.testing.assert_allclose(centres, normalize_scores(scores), atol=0.05)
    assert 0.0 <= heat.min() and heat.max() <= 1.0


def test_pooled_boxes_spanning_several_cells_are_painted_whole() -> None:
    boxes = np.array([[0, 0, 20, 20], [20, 0, 30, 10], [20, 10, 30, 20]])  # one 2x2 block, two cells
    heat = heat_array((40, 20), boxes, np.array([3.0, 1.0, 2.0]))
    assert np.all(heat[:, :20] == 1.0) and np.all(heat[:10, 20:30] == 0.0)
    assert np.allclose(heat[10:, 20:30], 0.5) and np.all(heat[:, 30:] == 0.0)  # uncovered: cold


def test_boxes_outside_the_page_or_bad_scores_are_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        heat_array((100, 100), np.array([[0, 0, 101, 10]]), np.array([1.0]))
    assert err.value.field == "boxes"
    with pytest.raises(InvalidArgument) as err:
        heat_array((100, 100), np.array([[0, 0, 10, 10]]), np.array([np.nan]))
    assert err.value.field == "scores"


# ------------------------------------------------------------------------------ render

def test_render_keeps_the_page_size_and_blends_by_alpha() -> None:
    page = Image.new("RGB", (210, 297), (255, 255, 255))
    boxes, scores = patch_boxes(ROWS, COLS, 210, 297), np.arange(ROWS * COLS, dtype=np.float32)
    assert render_heatmap(page, boxes, scores, alpha=0.0).tobytes() == page.tobytes()
    pure = render_heatmap(page, boxes, scores, alpha=1.0, smooth=False)
    table = colormap_table("mako")
    assert pure.size == page.size and pure.mode == "RGB"
    x0, y0, x1, y1 = boxes[-1]  # the highest score
    assert pure.getpixel((x0, y0)) == tuple(table[255]) and pure.getpixel((0, 0)) == tuple(table[0])
    half = np.asarray(render_heatmap(page, boxes, scores, smooth=False), dtype=np.float32)
    expected = 0.5 * 255 + 0.5 * np.asarray(pure, dtype=np.float32)
    assert np.abs(half - expected).max() <= 1.0


def test_hotter_is_lighter_in_mako_so_hot_patches_stand_out() -> None:
    luminance = colormap_table("mako").astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) >= 0) and luminance[-1] - luminance[0] > 200


def test_viridis_matches_matplotlib_within_six_levels() -> None:
    reference = np.rint(matplotlib.colormaps["viridis"](np.arange(256))[:, :3] * 255)
    assert np.abs(colormap_table("viridis").astype(np.int32) - reference).max() <= 6


def test_boxes_measured_on_the_full_page_map_onto_a_thumbnail() -> None:
    boxes = patch_boxes(2, 2, 400, 200)
    thumbnail = Image.new("RGB", (100, 50), "white")
    out = render_heatmap(thumbnail, boxes, np.array([0.0, 0.0, 0.0, 1.0]), alpha=1.0, smooth=False,
                         boxes_size=(400, 200))
    assert out.getpixel((75, 37)) == tuple(colormap_table("mako")[255])
    assert out.getpixel((10, 10)) == tuple(colormap_table("mako")[0])


def test_unknown_colormap_and_bad_alpha_are_refused() -> None:
    page, boxes = Image.new("RGB", (10, 10)), np.array([[0, 0, 10, 10]])
    with pytest.raises(InvalidArgument) as err:
        render_heatmap(page, boxes, np.array([1.0]), colormap="jet")
    assert err.value.field == "colormap"
    with pytest.raises(InvalidArgument) as err:
        render_heatmap(page, boxes, np.array([1.0]), alpha=1.5)
    assert err.value.field == "alpha"


def test_rendering_imports_neither_matplotlib_nor_torch() -> None:
    code = ("import sys, numpy as np; from PIL import Image; from colgrid_server.heatmap import render_heatmap; "
            "render_heatmap(Image.new('RGB', (8, 8)), np.array([[0, 0, 8, 8]]), np.array([1.0])); "
            "print(sorted(m for m in ('matplotlib', 'torch', 'seaborn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
