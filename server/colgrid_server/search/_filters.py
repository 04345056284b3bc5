"""Filtered search: which documents a search may return, from their metadata and ids.

A `DocumentFilter` holds conditions that must all hold (AND): a metadata field equals one of
some values (`any_of`; a list-valued field matches when any element does), or lies in a numeric
range (gte/gt/lte/lt), each optionally negated; and, optionally, a list of document ids.

`FilterIndex` answers a filter with a boolean mask over a version's documents. It indexes a
field the first time a filter names it (one pass over the documents' metadata) and keeps that
index for the version's lifetime: value -> documents for equality, sorted (value, document)
pairs for ranges. So a field used in filters costs one scan once, then a dictionary lookup or
two binary searches per search.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from colgrid_server.errors import InvalidArgument

MAX_CONDITIONS = 64
MAX_VALUES = 10_000  # per condition, and document ids per filter
MAX_FIELD_CHARS = 256
# Field indexes kept per version; past this the least recently used is dropped (rebuilt on
# demand), so filters over ever new fields cannot grow memory without bound.
MAX_INDEXED_FIELDS = 64


@dataclass(frozen=True)
class FieldCondition:
    """metadata[field] (dots reach into nested objects) equals one of any_of, or lies within the
    bounds; negate: the documents where it does not (those without the field included)."""

    field: str
    any_of: tuple[Any, ...] = ()
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None
    negate: bool = False

    @property
    def is_range(self) -> bool:
        return any(b is not None for b in (self.gte, self.gt, self.lte, self.lt))

    def check(self, position: int) -> None:
        where = f"filter.must[{position}]"
        if not self.field or len(self.field) > MAX_FIELD_CHARS or any(not part for part in self.field.split(".")):
            raise InvalidArgument(f"{where}.field must name a metadata key (dots for nested keys, at most "
                                  f"{MAX_FIELD_CHARS} characters), not {self.field!r}", field=f"{where}.field")
        if bool(self.any_of) == self.is_range:
            raise InvalidArgument(f"{where} ({self.field!r}) needs either any_of values or range bounds "
                                  "(gte/gt/lte/lt), and not both", field=where)
        if len(self.any_of) > MAX_VALUES:
            raise InvalidArgument(f"{where}.any_of has {len(self.any_of)} values; the limit is {MAX_VALUES}",
                                  field=f"{where}.any_of")
        for value in self.any_of:
            if value_key(value) is None:
                raise InvalidArgument(f"{where}.any_of: {value!r} is not a string, number or boolean",
                                      field=f"{where}.any_of")
        for name in ("gte", "gt", "lte", "lt"):
            bound = getattr(self, name)
            if bound is not None and not math.isfinite(bound):
                raise InvalidArgument(f"{where}.{name} must be a finite number", field=f"{where}.{name}")


@dataclass(frozen=True)
class DocumentFilter:
    must: tuple[FieldCondition, ...] = ()
    doc_ids: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if len(self.must) > MAX_CONDITIONS:
            raise InvalidArgument(f"filter has {len(self.must)} conditions; the limit is {MAX_CONDITIONS}",
                                  field="filter.must")
        if len(self.doc_ids) > MAX_VALUES:
            raise InvalidArgument(f"filter has {len(self.doc_ids)} document ids; the limit is {MAX_VALUES}",
                                  field="filter.doc_ids")
        for position, condition in enumerate(self.must):
            condition.check(position)

    @property
    def empty(self) -> bool:
        return not self.must and not self.doc_ids


def value_key(value: Any) -> tuple[str, Any] | None:
    """How a metadata value is compared: numbers as floats (1 == 1.0), never equal to strings
    or booleans (True is not 1). None for anything else (objects, null)."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        number = float(value)
        return ("n", number) if math.isfinite(number) else None
    if isinstance(value, str):
        return ("s", value)
    return None


def _values_at(metadata: Mapping[str, Any], path: Sequence[str]) -> Iterable[Any]:
    value: Any = metadata
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return ()
        value = value[part]
    return value if isinstance(value, list) else (value,)


@dataclass
class _FieldIndex:
    equal: dict[tuple[str, Any], np.ndarray]  # value key -> ascending document indices
    numbers: np.ndarray  # float64, ascending
    number_docs: np.ndarray  # int64: numbers[i] is a value of document number_docs[i]


class FilterIndex:
    """Masks over one version's documents; thread-safe, fields indexed on first use. Reads the
    version's metadata and ids when it builds an index (a closed version has none)."""

    def __init__(self, version: Any) -> None:
        self._version = version
        self.documents = int(version.documents)
        self._fields: OrderedDict[str, _FieldIndex] = OrderedDict()
        self._positions: dict[str, int] | None = None
        self._lock = threading.Lock()

    def mask(self, spec: DocumentFilter) -> np.ndarray:
        """bool (documents,): True where every condition holds."""
        allowed = np.ones(self.documents, dtype=bool)
        if spec.doc_ids:
            allowed = self._ids_mask(spec.doc_ids)
        for condition in spec.must:
            matched = self._matches(condition)
            allowed &= ~matched if condition.negate else matched
        return allowed

    def _matches(self, condition: FieldCondition) -> np.ndarray:
        index = self._field(condition.field)
        out = np.zeros(self.documents, dtype=bool)
        if condition.any_of:
            for value in condition.any_of:
                docs = index.equal.get(value_key(value))  # type: ignore[arg-type]  (checked)
                if docs is not None:
                    out[docs] = True
            return out
        lo, hi = 0, index.numbers.shape[0]
        if condition.gte is not None:
            lo = max(lo, int(np.searchsorted(index.numbers, condition.gte, side="left")))
        if condition.gt is not None:
            lo = max(lo, int(np.searchsorted(index.numbers, condition.gt, side="right")))
        if condition.lte is not None:
            hi = min(hi, int(np.searchsorted(index.numbers, condition.lte, side="right")))
        if condition.lt is not None:
            hi = min(hi, int(np.searchsorted(index.numbers, condition.lt, side="left")))
        if lo < hi:
            out[index.number_docs[lo:hi]] = True
        return out

    def _field(self, name: str) -> _FieldIndex:
        with self._lock:  # one scan per field, even when concurrent searches ask at once
            found = self._fields.get(name)
            if found is None:
                found = self._fields[name] = self._build(name)
                while len(self._fields) > MAX_INDEXED_FIELDS:
                    self._fields.popitem(last=False)
            else:
                self._fields.move_to_end(name)
            return found

    @property
    def indexed_fields(self) -> list[str]:
        with self._lock:
            return list(self._fields)

    def _build(self, name: str) -> _FieldIndex:
        self._version.require_open()
        path = name.split(".")
        # Keys are stored unescaped (ensure_ascii=False) unless they hold quotes, backslashes or
        # control characters: a plain key absent from a document's JSON text is not in it.
        plain = path[0].isprintable() and not any(c in path[0] for c in '"\\')
        equal: dict[tuple[str, Any], list[int]] = {}
        numbers: list[float] = []
        number_docs: list[int] = []
        for doc, raw in enumerate(self._version.metadata_json):
            if plain and path[0] not in raw:
                continue
            for value in _values_at(json.loads(raw), path):
                key = value_key(value)
                if key is None:
                    continue
                docs = equal.setdefault(key, [])
                if not docs or docs[-1] != doc:
                    docs.append(doc)
                if key[0] == "n":
                    numbers.append(key[1])
                    number_docs.append(doc)
        order = np.argsort(np.asarray(numbers, dtype=np.float64), kind="stable")
        return _FieldIndex(equal={k: np.asarray(v, dtype=np.int64) for k, v in equal.items()},
                           numbers=np.asarray(numbers, dtype=np.float64)[order],
                           number_docs=np.asarray(number_docs, dtype=np.int64)[order])

    def _ids_mask(self, doc_ids: Sequence[str]) -> np.ndarray:
        with self._lock:
            if self._positions is None:
                self._version.require_open()
                self._positions = {d: i for i, d in enumerate(self._version.doc_ids)}
            positions = self._positions
        out = np.zeros(self.documents, dtype=bool)
        found = [positions[d] for d in doc_ids if d in positions]  # ids not in this version match nothing
        out[np.asarray(found, dtype=np.int64)] = True
        return out


def parse_filter(value: Mapping[str, Any] | None, doc_ids: Sequence[str] = ()) -> DocumentFilter | None:
    """The JSON form (CLI, evaluation files): {"field": value | [values] | {"gte": .., "lt": ..}
    | {"not": value | [values]}}; None when there is nothing to filter on."""
    if not value and not doc_ids:
        return None
    if value is not None and not isinstance(value, Mapping):
        raise InvalidArgument(f"filter must be a JSON object of metadata fields, not {type(value).__name__}",
                              field="filter")
    conditions = []
    for name, spec in (value or {}).items():
        negate = False
        if isinstance(spec, Mapping) and set(spec) == {"not"}:
            negate, spec = True, spec["not"]
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"gte", "gt", "lte", "lt"}
            if unknown:
                raise InvalidArgument(f"filter field {name!r}: unknown keys {sorted(unknown)}; use gte, gt, lte, lt "
                                      "or not", field="filter")
            try:
                bounds = {k: float(v) for k, v in spec.items()}
            except (TypeError, ValueError):
                raise InvalidArgument(f"filter field {name!r}: range bounds must be numbers", field="filter") from None
            conditions.append(FieldCondition(field=str(name), negate=negate, **bounds))
        else:
            values = tuple(spec) if isinstance(spec, list) else (spec,)
            conditions.append(FieldCondition(field=str(name), any_of=values, negate=negate))
    return DocumentFilter(must=tuple(conditions), doc_ids=tuple(doc_ids))
