"""Walk files and directories, dispatch each file to its reader, and keep ids unique."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from colgrid_server.documents import MAX_DOC_ID_CHARS, Document, validate_document
from colgrid_server.errors import FailedPrecondition, InvalidArgument
from colgrid_server.ingest._images import IMAGE_SUFFIXES, iter_image
from colgrid_server.ingest._page_images import PageImageFormat, page_image_name, save_page_image
from colgrid_server.ingest._pdf import iter_pdf
from colgrid_server.ingest._types import ErrorCode, SourceError, SourceItem

TEXT_SUFFIXES = {".txt": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown"}
JSONL_SUFFIXES = frozenset({".jsonl"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = tuple(sorted({*TEXT_SUFFIXES, *JSONL_SUFFIXES, *PDF_SUFFIXES, *IMAGE_SUFFIXES}))
MAX_PDF_DPI = 600


def iter_sources(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *, pdf_dpi: int = 144,
                 max_image_pixels: int = 40_000_000, max_pdf_pages: int = 2000,
                 page_image_dir: str | Path | None = None,
                 page_image_format: PageImageFormat = "png") -> Iterator[SourceItem | SourceError]:
    """Stream documents from files and directories, one at a time, in a stable order.

    A directory is walked recursively in sorted order (hidden entries skipped; ids relative to
    it); a file given directly gets its own name as id. A bad input yields one `SourceError`
    and iteration goes on. With `page_image_dir`, each image item's page is saved there
    (`save_page_image`) and its metadata gets `page_image`, the file's path relative to that dir.
    """
    _check_limits(pdf_dpi, max_image_pixels, max_pdf_pages)
    if page_image_dir is not None:
        page_image_name("check", page_image_format)  # refuses an unknown format before any work
    roots = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    seen: set[str] = set()
    for root in roots:
        for file, produced in _iter_root(Path(root), pdf_dpi, max_image_pixels, max_pdf_pages):
            if isinstance(produced, SourceItem):
                refused = _check_id(produced, file, seen)
                if refused is not None:
                    produced = refused
                else:
                    seen.add(produced.id)
                    if page_image_dir is not None and produced.image is not None:
                        produced = _with_saved_page(produced, Path(page_image_dir), page_image_format)
            yield produced
            del produced  # the caller alone decides how long a page image lives


def _check_limits(pdf_dpi: int, max_image_pixels: int, max_pdf_pages: int) -> None:
    if not 1 <= pdf_dpi <= MAX_PDF_DPI:
        raise InvalidArgument(f"pdf_dpi must be between 1 and {MAX_PDF_DPI}, got {pdf_dpi}", field="pdf_dpi")
    if max_image_pixels < 1:
        raise InvalidArgument(f"max_image_pixels must be positive, got {max_image_pixels}", field="max_image_pixels")
    if max_pdf_pages < 1:
        raise InvalidArgument(f"max_pdf_pages must be positive, got {max_pdf_pages}", field="max_pdf_pages")


def _check_id(item: SourceItem, file: Path, seen: set[str]) -> SourceError | None:
    source = str(file)
    if len(item.id) > MAX_DOC_ID_CHARS:
        return SourceError(id=item.id[:MAX_DOC_ID_CHARS], path=source, code=ErrorCode.INVALID_DOCUMENT,
                           reason=f"its id is longer than {MAX_DOC_ID_CHARS} characters; shorten the path")
    if item.id in seen:
        return SourceError(id=item.id, path=source, code=ErrorCode.DUPLICATE_ID,
                           reason="an earlier input already produced this id; rename one of them")
    return None


def _with_saved_page(item: SourceItem, directory: Path, format: PageImageFormat) -> SourceItem:
    try:
        written = save_page_image(item, directory, format=format)
    except OSError as exc:  # the disk, not the input, is at fault: stop rather than index unviewable pages
        raise FailedPrecondition(f"cannot write page images to {directory}: {exc}") from exc
    return item.with_metadata(page_image=written.relative_to(directory).as_posix())


def _iter_root(root: Path, dpi: int, max_pixels: int,
               max_pages: int) -> Iterator[tuple[Path, SourceItem | SourceError]]:
    """(file it came from, what it produced) for everything under one path given by the caller."""
    if root.is_dir():
        for found in _walk(root, set()):
            if isinstance(found, SourceError):
                yield Path(found.path), found
            else:
                rel = found.relative_to(root).as_posix()
                for produced in _iter_file(found, rel, dpi, max_pixels, max_pages):
                    yield found, produced
                    del produced  # a loop variable would keep this page alive while the next renders
    elif root.is_file():
        for produced in _iter_file(root, root.name, dpi, max_pixels, max_pages):
            yield root, produced
            del produced
    else:
        if root.exists() or root.is_symlink():
            code = ErrorCode.UNREADABLE
            reason = "is not a regular file or directory" if root.exists() else "is a broken symbolic link"
        else:
            code, reason = ErrorCode.NOT_FOUND, "does not exist"
        yield root, SourceError(id=root.name or str(root), path=str(root), reason=reason, code=code)


def _walk(directory: Path, visited: set[Path]) -> Iterator[Path | SourceError]:
    """Files under `directory`, depth first, entries sorted by name. Symbolic links to
    directories are followed once (a link cycle is not walked twice)."""
    real = directory.resolve()
    if real in visited:
        return
    visited.add(real)
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        yield SourceError(id=directory.name, path=str(directory), code=ErrorCode.UNREADABLE,
                          reason=f"cannot list the directory: {exc.strerror or exc}")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue  # .git, .DS_Store, editor swap files: never documents
        if entry.is_dir():
            yield from _walk(entry, visited)
        else:
            yield entry


def _iter_file(path: Path, rel: str, dpi: int, max_pixels: int, max_pages: int) -> Iterator[SourceItem | SourceError]:
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        yield from iter_pdf(path, rel, rel, dpi=dpi, max_pixels=max_pixels, max_pages=max_pages)
    elif suffix in IMAGE_SUFFIXES:
        yield from iter_image(path, rel, rel, max_pixels=max_pixels)
    elif suffix in TEXT_SUFFIXES:
        yield _text_file(path, rel, TEXT_SUFFIXES[suffix])
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_file(path, rel)
    else:
        kind = f"{suffix!r} files are" if suffix else "files without an extension are"
        yield SourceError(id=rel, path=str(path), code=ErrorCode.UNSUPPORTED_TYPE,
                          reason=f"{kind} not supported; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _text_file(path: Path, rel: str, mime: str) -> SourceItem | SourceError:
    def error(code: ErrorCode, reason: str) -> SourceError:
        return SourceError(id=rel, path=str(path), reason=reason, code=code)

    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        return error(ErrorCode.UNREADABLE, f"cannot read the file: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        return error(ErrorCode.INVALID_DOCUMENT, f"is not UTF-8 text (byte {exc.start}); convert it to UTF-8")
    if not text.strip():
        return error(ErrorCode.INVALID_DOCUMENT, "has no text")
    return SourceItem(id=rel, kind="text", text=text, image=None, metadata={"source": rel, "mime": mime})


def _jsonl_file(path: Path, rel: str) -> Iterator[SourceItem | SourceError]:
    """The `documents.read_jsonl` format (`id`, `text`, optional `metadata` per line, validated by
    `validate_document`), read line by line so one bad line is one error and the others still
    index (read_jsonl stops at the first bad line). Lines are decoded one by one for the same reason."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        yield SourceError(id=rel, path=str(path), code=ErrorCode.UNREADABLE,
                          reason=f"cannot read the file: {exc.strerror or exc}")
        return
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield SourceError(id=f"{rel}#L{lineno}", path=str(path), code=ErrorCode.INVALID_DOCUMENT,
                                  reason=f"line {lineno} is not UTF-8 (byte {exc.start}); convert the file to UTF-8")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not part of the JSON
            if line.strip():
                yield _jsonl_line(line, lineno, path, rel)


def _jsonl_line(line: str, lineno: int, path: Path, rel: str) -> SourceItem | SourceError:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return SourceError(id=f"{rel}#L{lineno}", path=str(path), code=ErrorCode.INVALID_DOCUMENT,
                           reason=f"line {lineno} is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return SourceError(id=f"{rel}#L{lineno}", path=str(path), code=ErrorCode.INVALID_DOCUMENT,
                           reason=f"line {lineno}: expected a JSON object")
    try:
        doc = validate_document(Document(id=obj.get("id"), text=obj.get("text"), metadata=obj.get("metadata") or {}))
    except InvalidArgument as exc:
        return SourceError(id=f"{rel}#L{lineno}", path=str(path), code=ErrorCode.INVALID_DOCUMENT,
                           reason=f"line {lineno}: {exc}")
    metadata = dict(doc.metadata)
    metadata.setdefault("source", rel)  # the user's own metadata wins
    metadata.setdefault("line", lineno)
    return SourceItem(id=doc.id, kind="text", text=doc.text, image=None, metadata=metadata)
