"""Ingestion: files and directories -> a stream of documents to index (text or page images).

    iter_sources(paths, *, pdf_dpi=144, max_image_pixels=40_000_000, max_pdf_pages=2000,
                 page_image_dir=None, page_image_format="png") -> Iterator[SourceItem | SourceError]

What each input becomes (by file extension, case-insensitive):

    .jsonl                  one text document per line ({"id", "text", "metadata"?}, the format
                            `documents.read_jsonl` reads); a bad line is one error, the rest go on
    .txt .md .markdown      one text document (UTF-8), id = path
    .png .jpg .jpeg .webp   one image document, id = path (an animated WebP: its first frame)
    .tif .tiff              one image document per frame; a multi-page TIFF is a scanned document
                            like a PDF, so its frames are pages: `scan.tiff#p2`
    .pdf                    one image document per page, rendered by PDFium at `pdf_dpi`: `a.pdf#p3`

Metadata set on each item (JSONL documents keep their own metadata; `source` and `line` are
added only where absent):

    source                  path relative to the directory walked (or the file name)
    mime                    text/plain, text/markdown, image/png, image/jpeg, image/tiff,
                            image/webp, application/pdf
    width_px, height_px     size of the image the encoder sees (images, pages)
    page, page_count        1-based page number and total (PDF pages, multi-page TIFF frames)
    width_pt, height_pt     page size in PDF points (1/72 inch), after the page's rotation
    dpi                     rendering resolution (PDF pages)
    page_image              saved page image, relative to `page_image_dir` (when given)
    line                    line number (JSONL documents)

Building a version from sources lives in `colgrid_server.ingest.build` (it needs torch; this
package does not).

Refusals are `SourceError`s with a stable `code` (`ErrorCode`) and a reason a user can act on;
image sizes are checked from the file header and PDF page sizes from the page box, before any
pixel is decoded or rendered. The iterator holds at most the page being produced: a page image
lives as long as the caller keeps it.
"""
from colgrid_server.ingest._images import IMAGE_SUFFIXES, to_rgb
from colgrid_server.ingest._page_images import PageImageFormat, page_image_name, save_page_image
from colgrid_server.ingest._sources import SUPPORTED_SUFFIXES, iter_sources
from colgrid_server.ingest._types import ErrorCode, SourceError, SourceItem

__all__ = [
    "IMAGE_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "ErrorCode",
    "PageImageFormat",
    "SourceError",
    "SourceItem",
    "iter_sources",
    "page_image_name",
    "save_page_image",
    "to_rgb",
]
