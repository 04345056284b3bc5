"""Filtered search over metadata and document ids: masks equal a plain-Python reading of each
document's metadata for every kind of condition, searches return only permitted documents and
find what exhaustive search over the permitted ones finds, and bad filters are refused naming
the field at fault."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from colgrid_server.errors import InvalidArgument
from colgrid_server.index import open_version
from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version
from colgrid_server.search import DocumentFilter, FieldCondition, SearchParams, Searcher, parse_filter

DOCUMENTS = 400
LANGS = ("en", "de", "fr", "ja")


def metadata_of(i: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"n": i, "lang": LANGS[i % 4], "even": i % 2 == 0, "score": (i * 37 % 100) / 10,
                            "tags": [f"t{i % 3}", f"t{i % 5}"], "source": {"site": f"s{i % 6}"}}
    if i % 7 == 0:
        del meta["lang"]  # some documents lack a field
    if i % 11 == 0:
        meta["n"] = float(i)  # 3 and 3.0 are the same number
    return meta


@pytest.fixture(scope="module")
def corpus_and_searcher(tmp_path_factory):
    corpus = SyntheticCorpus(24, topics=20, noise=0.25, seed=11)
    docs = [dataclasses.replace(d, metadata=metadata_of(i))
            for i, d in enumerate(corpus.documents(DOCUMENTS, max_tokens=50))]
    path = tmp_path_factory.mktemp("filtered") / "v"
    write_synthetic_version(path, docs, corpus.encoder)
    return corpus, Searcher(open_version(path))


def reference(condition: FieldCondition, meta: dict[str, Any]) -> bool:
    """A plain reading of one condition on one document's metadata."""
    value: Any = meta
    for part in condition.field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    values = value if isinstance(value, list) else ([] if value is None else [value])

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, bool) or isinstance(b, bool):
            return isinstance(a, bool) and isinstance(b, bool) and a == b
        return a == b

    if condition.any_of:
        hit = any(same(v, w) for v in values for w in condition.any_of)
    else:
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        hit = any((condition.gte is None or x >= condition.gte) and (condition.gt is None or x > condition.gt)
                  and (condition.lte is None or x <= condition.lte) and (condition.lt is None or x < condition.lt)
                  for x in numbers)
    return hit != condition.negate


CONDITIONS = [
    FieldCondition("lang", any_of=("en",)),
    FieldCondition("lang", any_of=("en", "ja")),
    FieldCondition("lang", any_of=("en",), negate=True),  # documents without lang included
    FieldCondition("n", any_of=(11, 22.0, 7)),
    FieldCondition("even", any_of=(True,)),
    FieldCondition("even", any_of=(1,)),  # a number never equals a boolean
    FieldCondition("tags", any_of=("t2",)),  # any element of a list
    FieldCondition("source.site", any_of=("s1", "s4")),
    FieldCondition("score", gte=2.5, lt=7.0),
    FieldCondition("score", gt=9.0),
    FieldCondition("n", lte=50, negate=True),
    FieldCondition("missing", any_of=("x",)),
    FieldCondition("source", any_of=("s1",)),  # an object is never equal to a scalar
]


@pytest.mark.parametrize("condition", CONDITIONS, ids=lambda c: f"{c.field}{'-not' if c.negate else ''}")
def test_each_condition_masks_what_a_plain_reading_of_the_metadata_says(corpus_and_searcher, condition):
    _, searcher = corpus_and_searcher
    want = np.array([reference(condition, metadata_of(i)) for i in range(DOCUMENTS)])
    got = searcher.filters.mask(DocumentFilter(must=(condition,)))
    np.testing.assert_array_equal(got, want)


def test_conditions_and_document_ids_all_have_to_hold(corpus_and_searcher):
    _, searcher = corpus_and_searcher
    spec = DocumentFilter(must=(CONDITIONS[1], CONDITIONS[8]), doc_ids=("doc-0", "doc-1", "doc-5", "doc-9", "nope"))
    want = [i for i in (0, 1, 5, 9) if reference(CONDITIONS[1], metadata_of(i)) and reference(CONDITIONS[8], metadata_of(i))]
    assert np.flatnonzero(searcher.filters.mask(spec)).tolist() == want


@pytest.fixture()
def probing(monkeypatch):
    """Filtered searches on this small corpus take the probing path, not the exact one."""
    from colgrid_server.search import _searcher

    monkeypatch.setattr(_searcher, "EXACT_FILTERED_DOCS", 0)


def test_a_search_returns_only_permitted_documents_and_finds_the_filtered_best(corpus_and_searcher, probing):
    corpus, searcher = corpus_and_searcher
    spec = DocumentFilter(must=(FieldCondition("lang", any_of=("en", "de")),))  # ~200 documents
    permitted = {f"doc-{i}" for i in range(DOCUMENTS) if reference(spec.must[0], metadata_of(i))}
    recalls = []
    for n in (4, 9, 16):
        q = corpus.vectors(n)
        tokens = [f"t{i}" for i in range(n)]
        params = SearchParams(k=10, n_candidates=40)
        got = searcher.search(q, tokens, params, where=spec)
        want = searcher.exhaustive(q, tokens, params, where=spec)
        assert {h.doc_id for h in got.hits} <= permitted and len(got.hits) == 10
        assert {h.doc_id for h in want.hits} <= permitted
        recalls.append(len({h.doc_id for h in got.hits} & {h.doc_id for h in want.hits}) / 10)
    assert np.mean(recalls) >= 0.8


def test_a_selective_filter_scores_every_permitted_document_exactly(corpus_and_searcher):
    corpus, searcher = corpus_and_searcher
    spec = DocumentFilter(must=(FieldCondition("source.site", any_of=("s3",)), FieldCondition("even", any_of=(False,))))
    q = corpus.vectors(8)
    tokens = [f"t{i}" for i in range(8)]
    got = searcher.search(q, tokens, SearchParams(k=5), where=spec)
    want = searcher.exhaustive(q, tokens, SearchParams(k=5), where=spec)
    assert [h.doc_id for h in got.hits] == [h.doc_id for h in want.hits]
    assert got.stats.candidates == int(searcher.filters.mask(spec).sum())


def test_up_to_1024_permitted_documents_are_all_scored_exactly(corpus_and_searcher):
    corpus, searcher = corpus_and_searcher
    spec = DocumentFilter(must=(FieldCondition("lang", any_of=("en", "de", "fr")),))  # ~260 of 400
    q = corpus.vectors(8)
    tokens = [f"t{i}" for i in range(8)]
    got = searcher.search(q, tokens, SearchParams(k=10, n_candidates=20), where=spec)
    want = searcher.exhaustive(q, tokens, SearchParams(k=10), where=spec)
    assert got.stats.candidates == int(searcher.filters.mask(spec).sum()) > 2 * 20
    assert [h.doc_id for h in got.hits] == [h.doc_id for h in want.hits]


def test_probing_widens_when_the_filter_excludes_the_querys_neighbourhood(corpus_and_searcher, probing):
    corpus, searcher = corpus_and_searcher
    q = corpus.vectors(6)
    tokens = [f"t{i}" for i in range(6)]
    params = SearchParams(k=10, nprobe=1, n_candidates=10)
    near = {h.doc_id for h in searcher.search(q, tokens, SearchParams(k=60, nprobe=1, n_candidates=60)).hits}
    spec = DocumentFilter(doc_ids=tuple(f"doc-{i}" for i in range(DOCUMENTS) if f"doc-{i}" not in near))
    got = searcher.search(q, tokens, params, where=spec)
    assert len(got.hits) == 10 and not {h.doc_id for h in got.hits} & near


def test_a_filter_nothing_passes_returns_no_hits(corpus_and_searcher):
    corpus, searcher = corpus_and_searcher
    q = corpus.vectors(5)
    result = searcher.search(q, [f"t{i}" for i in range(5)], SearchParams(k=10),
                             where=DocumentFilter(must=(FieldCondition("lang", any_of=("xx",)),)))
    assert result.hits == () and result.stats.candidates == 0


@pytest.mark.parametrize("make, field", [
    (lambda: FieldCondition("", any_of=("a",)), "filter.must[0].field"),
    (lambda: FieldCondition("a..b", any_of=("a",)), "filter.must[0].field"),
    (lambda: FieldCondition("a"), "filter.must[0]"),
    (lambda: FieldCondition("a", any_of=("x",), gte=1.0), "filter.must[0]"),
    (lambda: FieldCondition("a", any_of=({"x": 1},)), "filter.must[0].any_of"),
    (lambda: FieldCondition("a", gte=float("nan")), "filter.must[0].gte"),
])
def test_a_malformed_condition_is_refused_naming_its_field(make, field):
    with pytest.raises(InvalidArgument) as info:
        DocumentFilter(must=(make(),))
    assert info.value.field == field


def test_limits_on_conditions_and_ids():
    with pytest.raises(InvalidArgument, match="limit"):
        DocumentFilter(must=tuple(FieldCondition(f"f{i}", any_of=(1,)) for i in range(65)))
    with pytest.raises(InvalidArgument, match="limit"):
        DocumentFilter(doc_ids=tuple(str(i) for i in range(10_001)))


def test_the_json_form_reads_values_lists_ranges_and_negations():
    spec = parse_filter({"lang": "en", "tags": ["a", "b"], "year": {"gte": 2020, "lt": 2024}, "draft": {"not": True}},
                        doc_ids=["d1"])
    assert spec == DocumentFilter(must=(FieldCondition("lang", any_of=("en",)), FieldCondition("tags", any_of=("a", "b")),
                                        FieldCondition("year", gte=2020.0, lt=2024.0),
                                        FieldCondition("draft", any_of=(True,), negate=True)), doc_ids=("d1",))
    assert parse_filter(None) is None and parse_filter({}) is None
    with pytest.raises(InvalidArgument, match="unknown keys"):
        parse_filter({"year": {"between": [1, 2]}})
    with pytest.raises(InvalidArgument, match="JSON object"):
        parse_filter(["lang"])  # type: ignore[arg-type]


def test_field_indexes_are_kept_for_the_most_recently_used_fields_only(corpus_and_searcher, monkeypatch):
    from colgrid_server.search import _filters

    _, searcher = corpus_and_searcher
    monkeypatch.setattr(_filters, "MAX_INDEXED_FIELDS", 2)
    index = _filters.FilterIndex(searcher.version)
    for name in ("lang", "even", "lang", "score"):
        index.mask(DocumentFilter(must=(FieldCondition(name, any_of=(1,)),)))
    assert index.indexed_fields == ["lang", "score"]
    want = np.array([reference(CONDITIONS[4], metadata_of(i)) for i in range(DOCUMENTS)])
    np.testing.assert_array_equal(index.mask(DocumentFilter(must=(CONDITIONS[4],))), want)  # "even", rebuilt
    assert index.indexed_fields == ["score", "even"]
