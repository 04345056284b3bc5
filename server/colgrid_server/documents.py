"""Input documents and the JSONL reader used by `colgrid index build`."""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colgrid_server.errors import InvalidArgument

MAX_DOC_ID_CHARS = 512


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


def validate_document(doc: Document) -> Document:
    if not isinstance(doc.id, str) or not doc.id.strip():
        raise InvalidArgument("document id must be a non-empty string", field="id")
    if len(doc.id) > MAX_DOC_ID_CHARS:
        raise InvalidArgument(f"document id longer than {MAX_DOC_ID_CHARS} characters", field="id")
    if not isinstance(doc.text, str) or not doc.text.strip():
        raise InvalidArgument(f"document {doc.id!r} has no text", field="text")
    if not isinstance(doc.metadata, Mapping):
        raise InvalidArgument(f"document {doc.id!r}: metadata must be a JSON object", field="metadata")
    return doc


def read_jsonl(path: str | Path) -> Iterator[Document]:
    """Stream documents from a JSONL file: one object per line with `id`, `text`, optional
    `metadata`. Errors name the line so a user can fix the file."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{path}:{lineno}: expected a JSON object")
            try:
                doc = Document(id=obj.get("id"), text=obj.get("text"), metadata=obj.get("metadata") or {})
                yield validate_document(doc)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{path}:{lineno}: {exc}", field=exc.field) from exc
