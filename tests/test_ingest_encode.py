"""End to end: a folder of real files -> ingested pages -> a served ColQwen2 encoder -> heatmaps.

A tiny random ColQwen2 is built offline and exported once per module (as the multimodal tests
do); the folder holds a matplotlib PDF (text, a table, a line chart), a PNG scan, a Markdown
note and a corrupt image. Vectors of a random model mean nothing, so these tests check geometry
and plumbing: boxes on the page, heatmaps of the page's size, hottest where the score is highest.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - before pyplot, so no display is needed
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.backends.backend_pdf import PdfPages
from PIL import Image, ImageDraw

from colgrid_server.encoders import EncodedImage, MultimodalEncoder, export_colqwen2, load_multimodal_encoder
from colgrid_server.encoders.tiny_models import build_tiny_colqwen2
from colgrid_server.heatmap import colormap_table, normalize_scores, patch_scores, render_heatmap
from colgrid_server.ingest import ErrorCode, SourceItem, iter_sources

QUERY = "line chart of revenue by month"
ALPHA = 0.5


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> MultimodalEncoder:
    root = tmp_path_factory.mktemp("tiny-colqwen2")
    report = export_colqwen2(build_tiny_colqwen2(root / "ckpt", seed=0), root / "encoder", progress=False)
    return load_multimodal_encoder(report.path, threads=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    with PdfPages(root / "report.pdf") as pdf:
        fig = plt.figure(figsize=(8.5, 11))
        fig.text(0.1, 0.9, "Quarterly Profit Margins", fontsize=22)
        pdf.savefig(fig)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(8.5, 11))
        ax.axis("off")
        ax.table(cellText=[["Q1", "10%"], ["Q2", "12%"]], colLabels=["Quarter", "Margin"], loc="center")
        pdf.savefig(fig)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(11, 8.5))
        ax.plot(range(12), [3, 4, 4, 5, 7, 6, 8, 9, 8, 10, 11, 12])
        ax.set_title("Revenue by month")
        pdf.savefig(fig)
        plt.close(fig)
    scan = Image.new("RGB", (500, 350), "white")
    draw = ImageDraw.Draw(scan)
    for y in range(20, 330, 18):
        draw.line([(20, y), (460, y)], fill=(30, 30, 30), width=3)
    scan.save(root / "scan.png")
    (root / "notes.md").write_text("# Notes\nThe line chart shows revenue by month.\n", encoding="utf-8")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


@pytest.fixture(scope="module")
def ingested(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path]:
    pages = tmp_path_factory.mktemp("page-images")
    return list(iter_sources(corpus, pdf_dpi=72, page_image_dir=pages)), pages


@pytest.fixture(scope="module")
def encoded(encoder: MultimodalEncoder, ingested) -> dict[str, tuple[SourceItem, EncodedImage]]:
    items = [r for r in ingested[0] if isinstance(r, SourceItem) and r.kind == "image"]
    return {item.id: (item, vectors) for item, vectors in zip(items, encoder.encode_images([i.image for i in items]))}


def _levels_at(rendered: Image.Image, page: Image.Image, pixels: list[np.ndarray]) -> np.ndarray:
    """The heat level (0-255) shown over each group of pixels: un-blend the page, then take the
    nearest colour of the colormap."""
    shown = np.asarray(rendered, dtype=np.float32)
    under = np.asarray(page.convert("RGB"), dtype=np.float32)
    colour = (shown - (1 - ALPHA) * under) / ALPHA
    table = colormap_table("mako").astype(np.float32)
    means = np.array([colour[ys, xs].reshape(-1, 3).mean(axis=0) for ys, xs in pixels])
    return np.argmin(((means[:, None, :] - table[None]) ** 2).sum(axis=2), axis=1)


def test_the_mixed_folder_yields_pages_text_and_one_error(ingested) -> None:
    results, _ = ingested
    assert [(r.id, type(r).__name__) for r in results] == [
        ("broken.png", "SourceError"), ("notes.md", "SourceItem"), ("report.pdf#p1", "SourceItem"),
        ("report.pdf#p2", "SourceItem"), ("report.pdf#p3", "SourceItem"), ("scan.png", "SourceItem")]
    assert results[0].code == ErrorCode.CORRUPT_IMAGE


def test_every_page_encodes_to_boxes_that_tile_the_page(encoded, encoder: MultimodalEncoder) -> None:
    assert set(encoded) == {"report.pdf#p1", "report.pdf#p2", "report.pdf#p3", "scan.png"}
    for item, page in encoded.values():
        width, height = item.metadata["width_px"], item.metadata["height_px"]
        assert page.size == item.image.size == (width, height)
        assert page.vectors.shape == (page.grid[0] * page.grid[1], encoder.dim)
        x0, y0, x1, y1 = page.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
        assert ((x1 > x0) & (y1 > y0)).all() and int(((x1 - x0) * (y1 - y0)).sum()) == width * height


def test_landscape_and_portrait_pages_get_grids_of_their_shape(encoded) -> None:
    text_page, chart = encoded["report.pdf#p1"][1], encoded["report.pdf#p3"][1]
    assert text_page.grid[0] > text_page.grid[1] and chart.grid[1] > chart.grid[0]


def test_text_documents_encode_with_the_same_encoder(ingested, encoder: MultimodalEncoder) -> None:
    (note,) = [r for r in ingested[0] if isinstance(r, SourceItem) and r.kind == "text"]
    (encoded,) = encoder.encode_documents([note.text])
    assert encoded.vectors.shape[1] == encoder.dim and len(encoded.tokens) == len(encoded.vectors)


def test_heatmap_png_has_the_page_size_and_is_hottest_on_the_best_box(encoded, encoder, ingested,
                                                                     tmp_path: Path) -> None:
    item, page = encoded["report.pdf#p3"]
    stored = Image.open(ingested[1] / item.metadata["page_image"])  # the page kept at ingest time
    (query,) = encoder.encode_queries([QUERY])
    scores = patch_scores(query.vectors, page.vectors)
    render_heatmap(stored, page.boxes, scores, alpha=ALPHA, smooth=False).save(tmp_path / "heat.png")
    with Image.open(tmp_path / "heat.png") as png:
        assert png.format == "PNG" and png.size == stored.size == item.image.size
        levels = _levels_at(png, stored, [(slice(y0, y1), slice(x0, x1)) for x0, y0, x1, y1 in page.boxes])
    expected = np.rint(normalize_scores(scores) * 255)
    assert np.abs(levels - expected).max() <= 1  # each box shows its own normalised score
    assert levels[int(np.argmax(scores))] == levels.max() == 255 and levels[int(np.argmin(scores))] == 0


def test_smoothed_heatmap_of_one_token_peaks_at_that_tokens_best_patch(encoded, encoder) -> None:
    item, page = encoded["scan.png"]
    (query,) = encoder.encode_queries([QUERY])
    token = 1
    scores = patch_scores(query.vectors, page.vectors, token)
    assert int(np.argmax(scores)) == int(np.argmax(page.vectors @ query.vectors[token]))
    rendered = render_heatmap(item.image, page.boxes, scores, alpha=ALPHA)
    centres = [(np.array([(y0 + y1) // 2]), np.array([(x0 + x1) // 2])) for x0, y0, x1, y1 in page.boxes]
    levels = _levels_at(rendered, item.image, centres)
    assert np.abs(levels - np.rint(normalize_scores(scores) * 255)).max() <= 6  # bicubic passes near each centre
    assert int(np.argmax(levels)) == int(np.argmax(scores))

