"""PDFs -> one RGB page image each, rendered with PDFium (pypdfium2) at a configured DPI.

Refusals are decided before rendering: a file without `%PDF-` near its start is not a PDF; one
without `%%EOF` near its end was cut short (PDFium would silently "repair" some truncated files
and lose pages, so a truncated file is refused whole); a password, zero pages or more than
`max_pdf_pages` refuse the whole file; a page that would render over `max_image_pixels` refuses
that page only. PDFium is not thread-safe, so every call into it holds one process-wide lock
(never across a `yield`, so concurrent ingests interleave page by page).
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from colgrid_server.ingest._types import ErrorCode, SourceError, SourceItem

_PDFIUM_LOCK = threading.RLock()
# Acrobat's tolerance: the header within the first 1024 bytes, %%EOF within the last 1024.
_ENVELOPE_BYTES = 1024
POINTS_PER_INCH = 72.0


def iter_pdf(path: Path, doc_id: str, rel: str, *, dpi: int, max_pixels: int,
             max_pages: int) -> Iterator[SourceItem | SourceError]:
    def error(code: ErrorCode, reason: str, page_id: str = doc_id) -> SourceError:
        return SourceError(id=page_id, path=str(path), reason=reason, code=code)

    problem = _envelope_problem(path)
    if problem is not None:
        yield error(*problem)
        return
    with _PDFIUM_LOCK:
        opened = _open(path)
    if isinstance(opened, tuple):
        yield error(*opened)
        return
    document = opened
    try:
        count = len(document)
        if count > max_pages:
            yield error(ErrorCode.PDF_TOO_MANY_PAGES, f"has {count:,} pages, over max_pdf_pages={max_pages:,}; "
                        "split it or raise the limit")
            return
        for index in range(count):
            page_id = f"{doc_id}#p{index + 1}"
            with _PDFIUM_LOCK:
                item = _render(document, index, count, page_id, rel, dpi, max_pixels, error)
            yield item
            del item  # hold no page beyond what the caller keeps while the next one renders
    finally:
        with _PDFIUM_LOCK:
            document.close()


def _envelope_problem(path: Path) -> tuple[ErrorCode, str] | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(_ENVELOPE_BYTES)
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _ENVELOPE_BYTES))
            tail = fh.read()
    except OSError as exc:
        return ErrorCode.UNREADABLE, f"cannot read the file: {exc.strerror or exc}"
    if b"%PDF-" not in head:
        return ErrorCode.PDF_CORRUPT, "is not a PDF (no %PDF- header in its first 1024 bytes)"
    if b"%%EOF" not in tail:
        return ErrorCode.PDF_TRUNCATED, (f"is truncated ({size:,} bytes, no %%EOF marker at the end): "
                                         "download or copy it again")
    return None


def _open(path: Path) -> pdfium.PdfDocument | tuple[ErrorCode, str]:
    # The raw loader, not PdfDocument(path): pypdfium2 reports a zero-page file with a stale
    # PDFium error code (often "incorrect password"); here a load failure and an empty document differ.
    raw = pdfium_c.FPDF_LoadDocument(os.fsencode(path) + b"\x00", None)
    if not raw:
        code = pdfium_c.FPDF_GetLastError()
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            return ErrorCode.PDF_ENCRYPTED, ("is password-protected; decrypt it first "
                                             "(e.g. qpdf --decrypt --password=PASSWORD in.pdf out.pdf)")
        if code == pdfium_c.FPDF_ERR_SECURITY:
            return ErrorCode.PDF_ENCRYPTED, "is encrypted with a security handler PDFium does not support"
        if code == pdfium_c.FPDF_ERR_FILE:
            return ErrorCode.UNREADABLE, "cannot be opened for reading"
        return ErrorCode.PDF_CORRUPT, "is damaged: PDFium cannot parse it (repair it, e.g. qpdf in.pdf out.pdf)"
    if pdfium_c.FPDF_GetPageCount(raw) < 1:
        pdfium_c.FPDF_CloseDocument(raw)
        return ErrorCode.PDF_EMPTY, "has no pages"
    document = pdfium.PdfDocument(raw)  # takes ownership of the handle
    try:
        document.init_forms()  # so filled-in form fields are drawn on the page
    except pdfium.PdfiumError:
        pass  # no usable form environment: the page content still renders
    return document


def _render(document: pdfium.PdfDocument, index: int, count: int, page_id: str, rel: str, dpi: int,
            max_pixels: int, error) -> SourceItem | SourceError:
    scale = dpi / POINTS_PER_INCH
    try:
        page = document[index]
    except pdfium.PdfiumError as exc:
        return error(ErrorCode.PDF_PAGE_FAILED, f"page {index + 1} cannot be loaded ({exc})", page_id)
    try:
        width_pt, height_pt = page.get_size()  # after the page's /Rotate, as rendered
        width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
        if width < 1 or height < 1:
            return error(ErrorCode.PDF_PAGE_FAILED, f"page {index + 1} has no area ({width_pt}x{height_pt} pt)",
                         page_id)
        if width * height > max_pixels:
            fits = int(POINTS_PER_INCH * math.sqrt(max_pixels / (width_pt * height_pt)))
            return error(ErrorCode.IMAGE_TOO_LARGE,
                         f"page {index + 1} is {width_pt:.0f}x{height_pt:.0f} pt: at {dpi} dpi that is "
                         f"{width}x{height} = {width * height:,} pixels, over max_image_pixels={max_pixels:,}; "
                         f"use pdf_dpi <= {fits}", page_id)
        bitmap = page.render(scale=scale, may_draw_forms=True)
        try:
            image = bitmap.to_pil()  # BGR bitmap -> RGB image: Pillow copies, nothing shares the buffer
        finally:
            bitmap.close()
    except pdfium.PdfiumError as exc:
        return error(ErrorCode.PDF_PAGE_FAILED, f"page {index + 1} cannot be rendered ({exc})", page_id)
    finally:
        page.close()
    metadata = {"source": rel, "mime": "application/pdf", "page": index + 1, "page_count": count,
                "width_px": image.width, "height_px": image.height,
                "width_pt": round(width_pt, 2), "height_pt": round(height_pt, 2), "dpi": dpi}
    return SourceItem(id=page_id, kind="image", text=None, image=image, metadata=metadata)
