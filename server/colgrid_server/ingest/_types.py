"""What ingestion yields: a document to encode (`SourceItem`) or why one input was refused (`SourceError`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from PIL import Image

from colgrid_server.documents import Document
from colgrid_server.errors import ColgridError, FailedPrecondition, InvalidArgument, ResourceExhausted


class ErrorCode(StrEnum):
    """Stable machine-readable reasons an input was refused (they are plain strings)."""

    NOT_FOUND = "not_found"                    # a path given to iter_sources does not exist
    UNREADABLE = "unreadable"                  # the OS refused to read it (permissions, vanished)
    UNSUPPORTED_TYPE = "unsupported_type"      # no reader for this file extension
    INVALID_DOCUMENT = "invalid_document"      # bad JSONL line, empty or non-UTF-8 text, bad id
    DUPLICATE_ID = "duplicate_id"              # an earlier input already produced this id
    CORRUPT_IMAGE = "corrupt_image"            # Pillow cannot identify or decode it
    IMAGE_TOO_LARGE = "image_too_large"        # over max_image_pixels (image, TIFF frame or rendered page)
    PDF_CORRUPT = "pdf_corrupt"                # not a PDF, or PDFium cannot parse it
    PDF_TRUNCATED = "pdf_truncated"            # the file ends before its %%EOF marker
    PDF_ENCRYPTED = "pdf_encrypted"            # needs a password (or an unsupported security handler)
    PDF_EMPTY = "pdf_empty"                    # a valid PDF with zero pages
    PDF_TOO_MANY_PAGES = "pdf_too_many_pages"  # over max_pdf_pages: refused whole, no page yielded
    PDF_PAGE_FAILED = "pdf_page_failed"        # PDFium could not load or render one page
    UNSUPPORTED_BY_ENCODER = "unsupported_by_encoder"  # an image for a text-only encoder


_EXHAUSTED = {ErrorCode.IMAGE_TOO_LARGE, ErrorCode.PDF_TOO_MANY_PAGES}


@dataclass(frozen=True)
class SourceItem:
    """One document to index. kind "text": `text` set, `image` None; kind "image": the reverse.

    id: stable and readable — the path relative to the directory walked (`reports/q3.pdf`), with
    `#p3` for page 3 of a PDF or of a multi-page TIFF; JSONL documents keep their own ids.
    image: RGB, decoded, independent of the file it came from.
    metadata: JSON-compatible; see `colgrid_server.ingest` for the keys ingestion sets.
    """

    id: str
    kind: Literal["text", "image"]
    text: str | None
    image: Image.Image | None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.kind == "text") != (self.text is not None) or (self.kind == "image") != (self.image is not None):
            raise ValueError(f"SourceItem {self.id!r}: kind {self.kind!r} must carry exactly its own payload")

    def with_metadata(self, **extra: Any) -> SourceItem:
        """A copy with `extra` merged into metadata (the original is untouched)."""
        return dataclasses.replace(self, metadata={**self.metadata, **extra})

    def to_document(self) -> Document:
        """The text `Document` the text index builder takes; image items have no text form."""
        if self.text is None:
            raise FailedPrecondition(f"source {self.id!r} is an image; encode it with a multimodal encoder")
        return Document(id=self.id, text=self.text, metadata=dict(self.metadata))


@dataclass(frozen=True)
class SourceError:
    """One input that could not become a document; iteration goes on with the rest.

    id: the document id it would have had (`scan.pdf#p4`, or `docs.jsonl#L12` for a JSONL line).
    path: the file (or directory) on disk. reason: a sentence a user can act on. code: stable.
    """

    id: str
    path: str
    reason: str
    code: ErrorCode

    def to_exception(self) -> ColgridError:
        """The error-tree exception for this refusal, for callers that report it as a status."""
        message = f"{self.id}: {self.reason}"
        if self.code in _EXHAUSTED:
            return ResourceExhausted(message)
        return InvalidArgument(message, field="path")
