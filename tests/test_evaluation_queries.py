"""Judged query sets read from files: the JSONL form, BEIR's queries.jsonl + qrels, and the
errors a user can fix (each names the file and line or the query)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from colgrid_server.errors import InvalidArgument
from colgrid_server.evaluation import JudgedQuery, check_queries, query_set_name, read_beir, read_query_set


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, *objects: object) -> Path:
    return write(path, "".join(json.dumps(o) + "\n" for o in objects))


def test_a_jsonl_query_set_reads_one_judged_query_per_line(tmp_path):
    path = jsonl(tmp_path / "dev.jsonl",
                 {"query_id": "q1", "query": "parse json", "relevant": {"json.loads": 2, "json": 1}},
                 {"query_id": 7, "query": "open a file", "relevant": ["io.open"]})
    first, second = read_query_set(path)
    assert first == JudgedQuery("q1", "parse json", {"json.loads": 2.0, "json": 1.0})
    assert (second.query_id, second.relevance) == ("7", {"io.open": 1.0})
    assert first.relevant == {"json.loads", "json"}


def test_beir_queries_and_a_tsv_qrels_read_only_the_judged_queries(tmp_path):
    queries = jsonl(tmp_path / "queries.jsonl", {"_id": "1", "text": "parse json"},
                    {"_id": "2", "text": "unjudged (another split)"}, {"_id": "3", "text": "open a file"})
    qrels = write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\n1\tjson.loads\t2\n1\tjson\t1\n3\tio.open\t1\n")
    read = read_beir(queries, qrels)
    assert [(q.query_id, q.text, dict(q.relevance)) for q in read] == [
        ("1", "parse json", {"json.loads": 2.0, "json": 1.0}), ("3", "open a file", {"io.open": 1.0})]


def test_trec_qrels_read_like_beir_ones(tmp_path):
    queries = jsonl(tmp_path / "queries.jsonl", {"_id": "1", "text": "parse json"})
    trec = write(tmp_path / "qrels.txt", "1 0 json.loads 2\n1 0 json 0\n")
    (query,) = read_beir(queries, trec)
    assert query.relevance == {"json.loads": 2.0, "json": 0.0} and query.relevant == {"json.loads"}


def test_qrels_judging_a_query_the_queries_file_lacks_are_refused(tmp_path):
    queries = jsonl(tmp_path / "queries.jsonl", {"_id": "1", "text": "parse json"})
    qrels = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\n9\tdoc\t1\n")
    with pytest.raises(InvalidArgument, match="1 queries that .* does not have .*'9'"):
        read_beir(queries, qrels)


@pytest.mark.parametrize("line, message", [
    ("not json", r"dev.jsonl:2: not valid JSON"),
    ('{"query_id": "q2", "query": "x", "relevant": {}}', r"dev.jsonl:2: relevant must be an object"),
    ('{"query_id": "q2", "query": "x", "relevant": {"d": "high"}}', r"dev.jsonl:2: the gain of 'd' must be a number"),
    ('{"query_id": "q2", "relevant": {"d": 1}}', r"dev.jsonl:2: query must be a non-empty string"),
    ('{"query_id": "q1", "query": "x", "relevant": {"d": 1}}', r"dev.jsonl: .*'q1' appears twice"),
    ('{"query_id": "q2", "query": "x", "relevant": {"d": 0}}', r"dev.jsonl: query 'q2' has no relevant document"),
])
def test_a_bad_line_is_refused_naming_where_it_is(tmp_path, line, message):
    path = write(tmp_path / "dev.jsonl", '{"query_id": "q1", "query": "ok", "relevant": {"d": 1}}\n' + line + "\n")
    with pytest.raises(InvalidArgument, match=message):
        read_query_set(path)


def test_a_qrels_line_with_a_wrong_column_count_names_its_line(tmp_path):
    queries = jsonl(tmp_path / "queries.jsonl", {"_id": "1", "text": "parse json"})
    qrels = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\n1\tjson\n")
    with pytest.raises(InvalidArgument, match=r"qrels.tsv:2: expected .* got 2 columns"):
        read_beir(queries, qrels)


def test_an_empty_query_set_is_refused():
    with pytest.raises(InvalidArgument, match="queries is empty"):
        check_queries([])


def test_the_default_name_of_a_query_set_depends_on_its_queries_and_judgements():
    base = [JudgedQuery("q1", "parse json", {"json": 1.0}), JudgedQuery("q2", "open", {"io": 2.0})]
    same = [JudgedQuery("q1", "parse json", {"json": 1.0}), JudgedQuery("q2", "open", {"io": 2.0})]
    regraded = [JudgedQuery("q1", "parse json", {"json": 2.0}), JudgedQuery("q2", "open", {"io": 2.0})]
    assert query_set_name(base) == query_set_name(same)
    assert query_set_name(base) != query_set_name(regraded) != query_set_name(base[:1])
    assert query_set_name(base).startswith("sha256:") and len(query_set_name(base)) == len("sha256:") + 16
