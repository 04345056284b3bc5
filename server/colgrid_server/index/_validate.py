"""Validation and encoding of what a VersionWriter is given: ids, spans, texts, metadata."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence, Set
from typing import Any

import numpy as np

from colgrid_server.errors import InvalidArgument


def first_duplicate(doc_ids: Sequence[str], existing: Set[str] = frozenset()) -> str | None:
    """The first id that is in existing or repeats an earlier one."""
    seen: set[str] = set()
    for doc_id in doc_ids:
        if doc_id in existing or doc_id in seen:
            return doc_id
        seen.add(doc_id)
    return None


def no_spans(n: int) -> np.ndarray:
    return np.full((n, 2), -1, dtype=np.int32)


def check_text(doc_id: str, text: object, *, required: bool) -> None:
    if not isinstance(text, str) or (required and not text):
        raise InvalidArgument(f"document {doc_id!r} has no text", field="text")


def check_utf8(doc_id: str, text: str) -> None:
    try:
        doc_id.encode("utf-8")
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"document {doc_id!r}: text or id is not valid UTF-8 ({exc.reason})", field="text") from exc


def metadata_json(doc_id: str, metadata: Mapping[str, Any] | None) -> str:
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidArgument(f"document {doc_id!r}: metadata must be a JSON object", field="metadata")
    return json_or_invalid(dict(metadata or {}), "metadata", doc_id)


def check_spans(doc_id: str, spans: np.ndarray, n: int, text: str) -> np.ndarray:
    check_text(doc_id, text, required=True)
    spans = np.asarray(spans)
    if spans.shape != (n, 2) or not np.issubdtype(spans.dtype, np.integer):
        raise InvalidArgument(
            f"document {doc_id!r}: spans must be integers of shape ({n}, 2), got {spans.dtype} {spans.shape}", field="spans"
        )
    start, end = spans[:, 0], spans[:, 1]
    absent = (start == -1) & (end == -1)
    valid = absent | ((start >= 0) & (start <= end) & (end <= len(text)))
    if not valid.all():
        bad = int(np.flatnonzero(~valid)[0])
        raise InvalidArgument(
            f"document {doc_id!r}: token {bad} has span {spans[bad].tolist()} outside its text of {len(text)} characters",
            field="spans",
        )
    return spans.astype(np.int32)


def json_or_invalid(value: Mapping[str, Any], field: str, doc_id: str | None = None) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        where = f"document {doc_id!r}: " if doc_id is not None else ""
        raise InvalidArgument(f"{where}{field} must be a JSON object ({exc})", field=field) from exc


def strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=np.dtypes.StringDType())
