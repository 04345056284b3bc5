"""Ingestion turns a mix of files into documents, one at a time; each bad input is one clear error.

Every file here is made by the test: multi-page PDFs drawn by matplotlib (text, a table, a line
chart) and by Pillow, encrypted with pypdf, truncated, emptied; images of several formats; a PNG
header claiming 50,000 x 50,000 pixels with no pixels behind it.
"""
from __future__ import annotations

import gc
import io
import json
import struct
import subprocess
import sys
import threading
import weakref
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - before pyplot, so no display is needed
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.backends.backend_pdf import PdfPages
from PIL import Image
from pypdf import PdfWriter

from colgrid_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from colgrid_server.ingest import (ErrorCode, SourceError, SourceItem, iter_sources, page_image_name,
                                   save_page_image)

LOW_DPI = 72  # 1 pt = 1 px: small pages, quick tests


from tests.documents_gen import (png_bytes, png_header_only, write_encrypted_pdf, write_pdf_with_pages,  # noqa: E402
                                  write_pillow_pdf, write_report_pdf, write_zero_page_pdf)


def split(results: list) -> tuple[list[SourceItem], list[SourceError]]:
    return ([r for r in results if isinstance(r, SourceItem)], [r for r in results if isinstance(r, SourceError)])


@pytest.fixture(scope="module")
def report_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report_pdf(tmp_path_factory.mktemp("pdfs") / "report.pdf")


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory, report_pdf: Path) -> Path:
    """Good inputs of every kind next to one of each bad input."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "report.pdf").write_bytes(report_pdf.read_bytes())
    write_pillow_pdf(root / "scans.pdf")
    (root / "truncated.pdf").write_bytes(report_pdf.read_bytes()[: report_pdf.stat().st_size // 2])
    write_encrypted_pdf(report_pdf, root / "encrypted.pdf")
    write_zero_page_pdf(root / "empty.pdf")
    (root / "images").mkdir()
    Image.new("RGB", (320, 240), (200, 30, 30)).save(root / "images" / "photo.jpg", quality=90)
    Image.new("RGB", (90, 60), (30, 200, 30)).save(root / "images" / "chart.webp")
    good_png = png_bytes(Image.effect_noise((200, 200), 60).convert("RGB"))
    (root / "images" / "corrupt.png").write_bytes(good_png[: len(good_png) * 2 // 3])
    (root / "images" / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    (root / "notes.md").write_text("# Notes\nLate interaction keeps one vector per token.\n", encoding="utf-8")
    (root / "slides.pptx").write_bytes(b"PK\x03\x04 not really a presentation")
    return root


@pytest.fixture(scope="module")
def mixed_results(mixed_dir: Path) -> list[SourceItem | SourceError]:
    return list(iter_sources(mixed_dir, pdf_dpi=LOW_DPI))


# ------------------------------------------------------------------------- a mixed batch

def test_each_bad_input_gives_exactly_one_error_with_its_code(mixed_results) -> None:
    _, errors = split(mixed_results)
    assert {e.id: e.code for e in errors} == {
        "truncated.pdf": ErrorCode.PDF_TRUNCATED,
        "encrypted.pdf": ErrorCode.PDF_ENCRYPTED,
        "empty.pdf": ErrorCode.PDF_EMPTY,
        "images/corrupt.png": ErrorCode.CORRUPT_IMAGE,
        "images/bomb.png": ErrorCode.IMAGE_TOO_LARGE,
        "slides.pptx": ErrorCode.UNSUPPORTED_TYPE,
    }
    assert len(errors) == 6


def test_every_good_input_is_still_yielded_in_sorted_path_order(mixed_results) -> None:
    items, _ = split(mixed_results)
    assert [i.id for i in items] == ["images/chart.webp", "images/photo.jpg", "notes.md", "report.pdf#p1",
                                     "report.pdf#p2", "report.pdf#p3", "scans.pdf#p1", "scans.pdf#p2"]


def test_errors_say_what_to_do_and_name_the_file(mixed_results, mixed_dir: Path) -> None:
    _, errors = split(mixed_results)
    by_id = {e.id: e for e in errors}
    assert "password" in by_id["encrypted.pdf"].reason and "decrypt" in by_id["encrypted.pdf"].reason
    assert "truncated" in by_id["truncated.pdf"].reason
    assert "no pages" in by_id["empty.pdf"].reason
    bomb = by_id["images/bomb.png"].reason
    assert "2,500,000,000 pixels" in bomb and "before decoding" in bomb
    assert ".pptx" in by_id["slides.pptx"].reason and ".pdf" in by_id["slides.pptx"].reason
    assert by_id["images/corrupt.png"].path == str(mixed_dir / "images" / "corrupt.png")


def test_error_codes_map_onto_the_error_tree() -> None:
    big = SourceError(id="a.png", path="/d/a.png", reason="too big", code=ErrorCode.IMAGE_TOO_LARGE)
    bad = SourceError(id="b.pdf", path="/d/b.pdf", reason="damaged", code=ErrorCode.PDF_CORRUPT)
    assert isinstance(big.to_exception(), ResourceExhausted)
    assert isinstance(bad.to_exception(), InvalidArgument) and "b.pdf: damaged" in str(bad.to_exception())


# ---------------------------------------------------------------------------------- PDFs

def test_pdf_pages_carry_source_page_and_sizes(report_pdf: Path) -> None:
    pages = list(iter_sources(report_pdf, pdf_dpi=144))
    assert [p.id for p in pages] == ["report.pdf#p1", "report.pdf#p2", "report.pdf#p3"]
    first, _, chart = pages
    assert first.metadata == {"source": "report.pdf", "mime": "application/pdf", "page": 1, "page_count": 3,
                              "width_px": 1224, "height_px": 1584, "width_pt": 612.0, "height_pt": 792.0,
                              "dpi": 144}
    assert (chart.metadata["width_pt"], chart.metadata["height_pt"]) == (792.0, 612.0)
    assert chart.image.size == (1584, 1224) and chart.image.mode == "RGB" and chart.kind == "image"


def test_rendered_pages_show_their_content(report_pdf: Path) -> None:
    text, table, chart = (np.asarray(p.image) for p in iter_sources(report_pdf, pdf_dpi=LOW_DPI))
    for page in (text, table, chart):
        assert page.min() < 80 and np.median(page) == 255  # dark ink on a white page
    assert (chart[:, :, 2] > chart[:, :, 0] + 60).any()  # matplotlib's blue line


def test_pillow_pdf_page_sizes_follow_its_resolution(tmp_path: Path) -> None:
    pages = list(iter_sources(write_pillow_pdf(tmp_path / "scans.pdf"), pdf_dpi=100))
    assert [(p.metadata["width_pt"], p.metadata["height_pt"]) for p in pages] == [(288.0, 360.0), (216.0, 144.0)]
    assert [p.image.size for p in pages] == [(400, 500), (300, 200)]


def test_a_page_too_large_to_render_is_refused_alone(tmp_path: Path) -> None:
    path = write_pdf_with_pages(tmp_path / "poster.pdf", [(612, 792), (5000, 5000), (300, 300)])
    items, errors = split(list(iter_sources(path, pdf_dpi=144)))
    assert [i.id for i in items] == ["poster.pdf#p1", "poster.pdf#p3"]
    assert [(e.id, e.code) for e in errors] == [("poster.pdf#p2", ErrorCode.IMAGE_TOO_LARGE)]
    assert "pdf_dpi <= 91" in errors[0].reason  # 5000 pt at 91 dpi is 6319 px a side: under 40 M pixels


def test_a_pdf_over_max_pages_is_refused_whole(report_pdf: Path) -> None:
    results = list(iter_sources(report_pdf, pdf_dpi=LOW_DPI, max_pdf_pages=2))
    assert [(r.id, r.code) for r in results] == [("report.pdf", ErrorCode.PDF_TOO_MANY_PAGES)]


def test_a_file_named_pdf_that_is_not_one_is_corrupt(tmp_path: Path) -> None:
    (tmp_path / "fake.pdf").write_bytes(b"<html>a web page saved with the wrong name</html>")
    (tmp_path / "damaged.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n")
    results = list(iter_sources(tmp_path))
    assert [(r.id, r.code) for r in results] == [("damaged.pdf", ErrorCode.PDF_CORRUPT),
                                                 ("fake.pdf", ErrorCode.PDF_CORRUPT)]


def test_concurrent_pdf_ingests_render_the_same_pages(report_pdf: Path) -> None:
    expected = [np.asarray(p.image) for p in iter_sources(report_pdf, pdf_dpi=LOW_DPI)]
    outputs: list[list[np.ndarray]] = [[], [], []]

    def ingest(slot: int) -> None:
        outputs[slot] = [np.asarray(p.image) for p in iter_sources(report_pdf, pdf_dpi=LOW_DPI)]
    threads = [threading.Thread(target=ingest, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for pages in outputs:
        assert len(pages) == 3 and all(np.array_equal(a, b) for a, b in zip(pages, expected))


def _live_images(size: tuple[int, int]) -> int:
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Image.Image) and o.size == size)


def test_a_page_the_caller_let_go_is_freed_before_the_next_one_renders(tmp_path: Path) -> None:
    size = (123, 321)  # a page size no other test renders, so only this PDF's pages count
    pages = iter_sources(write_pdf_with_pages(tmp_path / "odd.pdf", [size] * 3), pdf_dpi=72)
    first = next(pages)
    alive_when_freed: list[int] = []
    weakref.finalize(first.image, lambda: alive_when_freed.append(_live_images(size)))
    del first
    second = next(pages)
    assert alive_when_freed == [0]  # page 1 went before page 2 existed
    assert second.id == "odd.pdf#p2" and _live_images(size) == 1


# -------------------------------------------------------------------------------- images

def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header_only(50_000, 50_000))
    # 8,000 x 6,000 = 48 M pixels: under Pillow's own bomb limit, over ours.
    (tmp_path / "big.png").write_bytes(png_header_only(8_000, 6_000))
    results = list(iter_sources(tmp_path))
    assert [(r.id, r.code) for r in results] == [("big.png", ErrorCode.IMAGE_TOO_LARGE),
                                                 ("bomb.png", ErrorCode.IMAGE_TOO_LARGE)]
    assert "8000x6000" in results[0].reason and "max_image_pixels=40,000,000" in results[0].reason


def test_max_image_pixels_is_configurable(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100), "white").save(tmp_path / "page.png")
    assert [r.code for r in iter_sources(tmp_path, max_image_pixels=19_999)] == [ErrorCode.IMAGE_TOO_LARGE]
    assert isinstance(next(iter_sources(tmp_path, max_image_pixels=20_000)), SourceItem)


def test_image_metadata_and_pixels(tmp_path: Path) -> None:
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "a.png")
    (item,) = iter_sources(tmp_path / "a.png")
    assert item.id == "a.png" and item.kind == "image" and item.text is None
    assert item.metadata == {"source": "a.png", "mime": "image/png", "width_px": 64, "height_px": 48}
    assert np.asarray(item.image)[0, 0].tolist() == [10, 20, 30]


def test_every_page_of_a_multi_page_tiff_is_a_document(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (120, 160), (i * 80, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "scan.tiff", save_all=True, append_images=frames[1:])
    items = list(iter_sources(tmp_path))
    assert [i.id for i in items] == ["scan.tiff#p1", "scan.tiff#p2", "scan.tiff#p3"]
    assert [(i.metadata["page"], i.metadata["page_count"]) for i in items] == [(1, 3), (2, 3), (3, 3)]
    assert [np.asarray(i.image)[0, 0, 0] for i in items] == [0, 80, 160]


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write portrait scans
    Image.new("RGB", (300, 200), "white").save(tmp_path / "phone.jpg", exif=exif)
    (item,) = iter_sources(tmp_path)
    assert item.image.size == (200, 300) and (item.metadata["width_px"], item.metadata["height_px"]) == (200, 300)


def test_transparency_is_flattened_onto_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.putpixel((5, 5), (200, 0, 0, 255))
    image.save(tmp_path / "logo.png")
    (item,) = iter_sources(tmp_path)
    pixels = np.asarray(item.image)
    assert item.image.mode == "RGB" and pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[5, 5].tolist() == [200, 0, 0]


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "scan16.png")  # mode I;16
    (item,) = iter_sources(tmp_path)
    assert np.asarray(item.image)[0, :, 0].tolist() == [0, 128, 255]


def test_an_image_format_we_do_not_read_is_unsupported_even_with_a_good_suffix(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.png", format="GIF")
    (error,) = iter_sources(tmp_path)
    assert error.code == ErrorCode.UNSUPPORTED_TYPE and "GIF" in error.reason


def test_random_bytes_named_png_are_a_corrupt_image(tmp_path: Path) -> None:
    (tmp_path / "noise.png").write_bytes(bytes(range(256)))
    (error,) = iter_sources(tmp_path)
    assert error.code == ErrorCode.CORRUPT_IMAGE


# ---------------------------------------------------------------------------- text, JSONL

def test_text_and_markdown_files_are_one_document_each(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain words", encoding="utf-8")
    (tmp_path / "b.md").write_bytes(b"\xef\xbb\xbf# Title\nbody")  # a BOM is not part of the text
    a, b = iter_sources(tmp_path)
    assert (a.id, a.kind, a.text, a.image) == ("a.txt", "text", "plain words", None)
    assert b.text == "# Title\nbody" and b.metadata == {"source": "b.md", "mime": "text/markdown"}
    assert b.to_document().text == "# Title\nbody"


def test_empty_and_non_utf8_text_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    errors = list(iter_sources(tmp_path))
    assert [(e.id, e.code) for e in errors] == [("blank.txt", ErrorCode.INVALID_DOCUMENT),
                                                ("latin1.txt", ErrorCode.INVALID_DOCUMENT)]
    assert "UTF-8" in errors[1].reason


def test_a_bad_jsonl_line_is_one_error_and_the_other_lines_index(tmp_path: Path) -> None:
    lines = [json.dumps({"id": "d1", "text": "first", "metadata": {"lang": "en", "source": "crm"}}),
             "{not json", json.dumps({"id": "d3", "text": ""}), "", json.dumps({"id": "d4", "text": "fourth"})]
    latin1 = json.dumps({"id": "d6", "text": "café"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "docs.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8") + latin1 + b"\n"
                                          + json.dumps({"id": "d7", "text": "seventh"}).encode("utf-8"))
    results = list(iter_sources(tmp_path))
    items, errors = split(results)
    assert [i.id for i in items] == ["d1", "d4", "d7"]
    assert items[0].metadata == {"lang": "en", "source": "crm", "line": 1}  # the user's own keys win
    assert items[1].metadata == {"source": "docs.jsonl", "line": 5}
    assert [(e.id, e.code) for e in errors] == [("docs.jsonl#L2", ErrorCode.INVALID_DOCUMENT),
                                                ("docs.jsonl#L3", ErrorCode.INVALID_DOCUMENT),
                                                ("docs.jsonl#L6", ErrorCode.INVALID_DOCUMENT)]
    assert "not UTF-8" in errors[2].reason


# ------------------------------------------------------------------------- walking, ids

def test_walk_is_sorted_recursive_and_skips_hidden_entries(tmp_path: Path) -> None:
    for rel in ["b.txt", "a/z.txt", "a/b/c.md", "a.txt", ".hidden.txt", ".git/config.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel, encoding="utf-8")
    assert [i.id for i in iter_sources(tmp_path)] == ["a/b/c.md", "a/z.txt", "a.txt", "b.txt"]


def test_paths_given_directly_mix_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("x", encoding="utf-8")
    (tmp_path / "single.md").write_text("y", encoding="utf-8")
    results = list(iter_sources([tmp_path / "single.md", str(tmp_path / "dir"), tmp_path / "missing.pdf"]))
    assert [(r.id, type(r).__name__) for r in results] == [("single.md", "SourceItem"), ("x.txt", "SourceItem"),
                                                           ("missing.pdf", "SourceError")]
    assert results[2].code == ErrorCode.NOT_FOUND


def test_the_same_id_from_two_inputs_is_refused_the_second_time(tmp_path: Path) -> None:
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.txt").write_text(sub, encoding="utf-8")
    results = list(iter_sources([tmp_path / "one", tmp_path / "two"]))
    assert [(type(r).__name__, r.id) for r in results] == [("SourceItem", "same.txt"), ("SourceError", "same.txt")]
    assert results[1].code == ErrorCode.DUPLICATE_ID and results[1].path == str(tmp_path / "two" / "same.txt")


def test_limits_are_checked_before_any_file_is_read(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        next(iter_sources(tmp_path, pdf_dpi=0))
    assert err.value.field == "pdf_dpi"
    with pytest.raises(InvalidArgument) as err:
        next(iter_sources(tmp_path, page_image_dir=tmp_path / "pages", page_image_format="gif"))
    assert err.value.field == "format"


def test_a_source_item_carries_exactly_its_own_payload() -> None:
    with pytest.raises(ValueError):
        SourceItem(id="x", kind="image", text="words", image=None)
    image_item = SourceItem(id="p", kind="image", text=None, image=Image.new("RGB", (2, 2)))
    with pytest.raises(FailedPrecondition):
        image_item.to_document()


# --------------------------------------------------------------------------- page images

def test_page_images_are_saved_and_recorded_in_metadata(tmp_path: Path, report_pdf: Path) -> None:
    store = tmp_path / "pages"
    items = list(iter_sources(report_pdf, pdf_dpi=LOW_DPI, page_image_dir=store))
    for item in items:
        saved = store / item.metadata["page_image"]
        with Image.open(saved) as reread:
            assert reread.format == "PNG" and np.array_equal(np.asarray(reread), np.asarray(item.image))
    assert sorted(p.name for p in store.iterdir()) == sorted(i.metadata["page_image"] for i in items)


def test_save_page_image_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    item = SourceItem(id="a/b.pdf#p1", kind="image", text=None, image=Image.new("RGB", (30, 20), "red"))
    first = save_page_image(item, tmp_path)
    second = save_page_image(item.__class__(id=item.id, kind="image", text=None,
                                            image=Image.new("RGB", (30, 20), "blue")), tmp_path, format="webp")
    third = save_page_image(item.__class__(id=item.id, kind="image", text=None,
                                           image=Image.new("RGB", (30, 20), "blue")), tmp_path)
    assert first == third and second.suffix == ".webp" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.name, second.name])
    with Image.open(third) as reread:
        assert reread.getpixel((0, 0)) == (0, 0, 255)


def test_page_image_names_are_flat_safe_and_distinct() -> None:
    a, b = page_image_name("reports/q3 final.pdf#p3"), page_image_name("reports/q3_final.pdf#p3")
    assert a != b and "/" not in a and " " not in a and a.startswith("reports_q3_final.pdf_p3-") and a.endswith(".png")


def test_text_items_have_no_page_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        save_page_image(SourceItem(id="t", kind="text", text="words", image=None), tmp_path)


def test_ingest_imports_neither_torch_nor_matplotlib(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    code = (f"import sys; from colgrid_server.ingest import iter_sources; list(iter_sources({str(tmp_path)!r})); "
            "print(sorted(m for m in ('matplotlib', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
