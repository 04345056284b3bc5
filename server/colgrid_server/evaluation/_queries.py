"""Judged query sets: queries with relevance judgements (graded gains), read from files and checked.

Two file layouts are read:

- one JSONL file, one query per line:
  `{"query_id": "q1", "query": "text", "relevant": {"doc-7": 2, "doc-9": 1}}`
  (`relevant` may also be a list of document ids, each with gain 1);
- BEIR's pair: `queries.jsonl` (`{"_id": "q1", "text": "..."}` per line) and a qrels file,
  tab-separated `query-id corpus-id score` with a header line (BEIR), or TREC's
  whitespace-separated `query-id 0 corpus-id score` without one. Only queries that have
  judgements are kept (a BEIR queries.jsonl holds every split).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colgrid_server.errors import InvalidArgument

MAX_QUERY_ID_CHARS = 512


@dataclass(frozen=True)
class JudgedQuery:
    """One query of a query set: text (or vectors computed elsewhere) and its judgements,
    document id -> gain. A gain > 0 marks the document relevant; 0 records a judged
    non-relevant document (it counts for nothing, as in trec_eval)."""

    query_id: str
    text: str = ""
    relevance: Mapping[str, float] = field(default_factory=dict, hash=False)
    vectors: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def relevant(self) -> frozenset[str]:
        return frozenset(doc for doc, gain in self.relevance.items() if gain > 0)


def check_queries(queries: Sequence[JudgedQuery], *, max_query_chars: int | None = None,
                  field_name: str = "queries") -> Sequence[JudgedQuery]:
    """Refuse a query set that cannot be scored: empty, duplicate or empty ids, no text (and no
    vectors), negative or non-finite gains, or a query without any relevant document (its
    nDCG would be 0/0). Errors name the offending query."""
    if not queries:
        raise InvalidArgument(f"{field_name} is empty: send at least one judged query", field=field_name)
    seen: set[str] = set()
    for i, q in enumerate(queries):
        where = f"{field_name}[{i}]"
        if not isinstance(q.query_id, str) or not q.query_id.strip():
            raise InvalidArgument(f"{where} has no query_id", field=f"{where}.query_id")
        if len(q.query_id) > MAX_QUERY_ID_CHARS:
            raise InvalidArgument(f"{where}: query_id longer than {MAX_QUERY_ID_CHARS} characters",
                                  field=f"{where}.query_id")
        if q.query_id in seen:
            raise InvalidArgument(f"{where}: query_id {q.query_id!r} appears twice", field=f"{where}.query_id")
        seen.add(q.query_id)
        if q.vectors is None and not q.text.strip():
            raise InvalidArgument(f"query {q.query_id!r} has no text (and no query vectors)", field=f"{where}.text")
        if q.vectors is not None and q.text.strip():
            raise InvalidArgument(f"query {q.query_id!r}: send either text or query vectors, not both",
                                  field=f"{where}.query_vectors")
        if max_query_chars is not None and len(q.text) > max_query_chars:
            raise InvalidArgument(f"query {q.query_id!r} has {len(q.text)} characters; the limit is "
                                  f"{max_query_chars}", field=f"{where}.text")
        for doc, gain in q.relevance.items():
            if not isinstance(doc, str) or not doc.strip():
                raise InvalidArgument(f"query {q.query_id!r} judges an empty document id",
                                      field=f"{where}.judgements")
            if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain) or gain < 0:
                raise InvalidArgument(f"query {q.query_id!r}: the relevance of {doc!r} must be a finite number "
                                      f">= 0, got {gain!r}", field=f"{where}.judgements")
        if not q.relevant:
            raise InvalidArgument(f"query {q.query_id!r} has no relevant document (no judgement with relevance "
                                  f"> 0): it cannot be scored; drop it or judge it", field=f"{where}.judgements")
    return queries


def query_set_name(queries: Iterable[JudgedQuery]) -> str:
    """A name for an unnamed query set: a digest of its queries and judgements (order kept), so
    the same judged set gets the same name on every run and evaluations stay comparable."""
    digest = hashlib.sha256()
    for q in queries:
        vectors = "" if q.vectors is None else hashlib.sha256(
            np.ascontiguousarray(q.vectors, dtype="<f4").tobytes()).hexdigest()
        line = [q.query_id, q.text, vectors, sorted((doc, float(g)) for doc, g in q.relevance.items())]
        digest.update(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return f"sha256:{digest.hexdigest()[:16]}"


# --- files -------------------------------------------------------------------------------------

def read_query_set(path: str | Path) -> list[JudgedQuery]:
    """The queries of a JSONL query set (one `{query_id, query, relevant}` object per line),
    checked. Errors name the line."""
    queries = []
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        query_id = _string(obj.get("query_id"), f"{where}: query_id")
        text = _string(obj.get("query"), f"{where}: query")
        queries.append(JudgedQuery(query_id, text, _relevance(obj.get("relevant"), where)))
    return _checked(queries, path)


def read_beir(queries_path: str | Path, qrels_path: str | Path) -> list[JudgedQuery]:
    """BEIR-style `queries.jsonl` + qrels (TSV with a header, or TREC's four columns), checked;
    queries without judgements are left out, in queries.jsonl order."""
    judgements = read_qrels(qrels_path)
    texts: dict[str, str] = {}
    for lineno, obj in _jsonl(queries_path):
        texts[_string(obj.get("_id", obj.get("query_id")), f"{queries_path}:{lineno}: _id")] = \
            _string(obj.get("text", obj.get("query")), f"{queries_path}:{lineno}: text")
    missing = [qid for qid in judgements if qid not in texts]
    if missing:
        raise InvalidArgument(f"{qrels_path} judges {len(missing)} queries that {queries_path} does not have "
                              f"(e.g. {missing[0]!r})", field="queries")
    return _checked([JudgedQuery(qid, text, judgements[qid]) for qid, text in texts.items() if qid in judgements],
                    qrels_path)


def read_qrels(path: str | Path) -> dict[str, dict[str, float]]:
    """{query id: {doc id: gain}} from a BEIR TSV (`query-id corpus-id score`, header line) or
    a TREC qrels file (`query-id iteration corpus-id score`)."""
    out: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            cells = line.split("\t") if "\t" in line else line.split()
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if lineno == 1 and cells[-1].lower() in ("score", "relevance", "rel"):
                continue  # BEIR's header
            if len(cells) == 4:
                cells = [cells[0], cells[2], cells[3]]
            if len(cells) != 3:
                raise InvalidArgument(f"{path}:{lineno}: expected `query-id<TAB>corpus-id<TAB>score` (or TREC's "
                                      f"four columns), got {len(cells)} columns", field="qrels")
            query_id, doc_id, score = cells
            try:
                gain = float(score)
            except ValueError:
                raise InvalidArgument(f"{path}:{lineno}: score {score!r} is not a number", field="qrels") from None
            out.setdefault(query_id, {})[doc_id] = gain
    return out


def _checked(queries: list[JudgedQuery], path: str | Path) -> list[JudgedQuery]:
    try:
        check_queries(queries)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{path}: {exc}", field=exc.field) from exc
    return queries


def _jsonl(path: str | Path) -> Iterator[tuple[int, Mapping[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{lineno}: not valid JSON ({exc.msg})", field="queries") from exc
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{path}:{lineno}: expected a JSON object", field="queries")
            yield lineno, obj


def _string(value: object, what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # numeric ids are common in qrels
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{what} must be a non-empty string, got {value!r}", field="queries")
    return value


def _relevance(value: object, where: str) -> dict[str, float]:
    if isinstance(value, list):
        return {_string(doc, f"{where}: relevant[]"): 1.0 for doc in value}
    if not isinstance(value, dict) or not value:
        raise InvalidArgument(f"{where}: relevant must be an object {{doc_id: gain}} (or a list of doc ids), "
                              f"got {value!r}", field="queries")
    out = {}
    for doc, gain in value.items():
        if isinstance(gain, bool) or not isinstance(gain, (int, float)):
            raise InvalidArgument(f"{where}: the gain of {doc!r} must be a number, got {gain!r}", field="queries")
        out[doc] = float(gain)
    return out
