"""`colgrid eval` and `colgrid rollout promote --max-ndcg-drop ...` against a live server."""
from __future__ import annotations

import json

import pytest

from colgrid_server.cli import main
from tests.test_evaluation_support import (  # noqa: F401 - fixtures
    INDEX, JUDGED, eval_template, eval_versions, queries, rollout_documents, serving, tiny_checkpoint,
    tiny_encoder_dir, write_jsonl)


def colgrid(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, dict[str, str]]:
    """{version: {column: cell}} from the printed table (header line, then one row per version)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("VERSION"))
    headers = lines[start].replace("P50 MS", "P50").replace("P95 MS", "P95").replace("P99 MS", "P99").split()
    rows = [line.split() for line in lines[start + 1:] if line and not line.startswith("MISSING:")]
    return {row[0]: dict(zip(headers, row)) for row in rows}


def test_eval_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: colgrid eval")


def test_eval_prints_one_row_per_version_with_the_server_scores(eval_versions, queries, tmp_path, capsys):
    path = write_jsonl(tmp_path / "dev.jsonl", queries)
    with serving(eval_versions) as s:
        code, out, err = colgrid(capsys, "eval", INDEX, str(path), "--version", "v1", "--version", "v2",
                                 "--target", s.target)
        expected = s.client.evaluate(INDEX, queries, versions=["v1", "v2"])
    assert code == 0, err
    assert out.splitlines()[0] == f"{INDEX}: query set {expected[0].query_set!r}, {JUDGED} queries"
    rows = table(out)
    assert list(rows) == ["v1", "v2"]
    for result in expected:
        row = rows[result.version]
        assert (row["nDCG@10"], row["RECALL@100"], row["MRR@10"]) == (
            f"{result.ndcg_at_10:.3f}", f"{result.recall_at_k:.3f}", f"{result.mrr_at_10:.3f}")
        assert row["MISSING"] == str(result.judged_missing)
    assert float(rows["v1"]["nDCG@10"]) > float(rows["v2"]["nDCG@10"])


def test_eval_record_stores_the_results_under_the_query_set_name(eval_versions, queries, tmp_path, capsys):
    path = write_jsonl(tmp_path / "dev.jsonl", queries)
    with serving(eval_versions) as s:
        code, out, _ = colgrid(capsys, "eval", INDEX, str(path), "--record", "--query-set", "dev", "-k", "20",
                               "--target", s.target)
        (stored,) = s.registry.evaluations(INDEX, "v1")
    assert code == 0 and "(recorded in the registry)" in out and list(table(out)) == ["v1"]
    assert stored.query_set == "dev" and f"{stored.metrics['recall@20']:.3f}" == table(out)["v1"]["RECALL@20"]
    code, shown, _ = colgrid(capsys, "registry", "show", INDEX, "v1", "--data-dir", str(eval_versions))
    assert code == 0 and "evaluations:" in shown and " dev " in shown and "recall@20=" in shown


def test_eval_json_prints_every_field(eval_versions, queries, tmp_path, capsys):
    path = write_jsonl(tmp_path / "dev.jsonl", queries[:10])
    with serving(eval_versions) as s:
        code, out, _ = colgrid(capsys, "eval", INDEX, str(path), "--version", "v2", "--json", "--target", s.target)
    printed = json.loads(out)
    (result,) = printed["results"]
    assert code == 0 and printed["index"] == INDEX
    assert result["version"] == "v2" and result["queries"] == 10 and result["metrics"]["ndcg@10"] == result[
        "ndcg_at_10"]


def test_beir_queries_and_qrels_score_like_the_same_judgements_in_jsonl(eval_versions, queries, tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "dev.jsonl", queries)
    beir_queries = write_jsonl(tmp_path / "queries.jsonl",
                               [{"_id": q["query_id"], "text": q["query"]} for q in queries])
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['query_id']}\t{doc}\t{int(gain)}\n" for q in queries for doc, gain in q["relevant"].items()))
    with serving(eval_versions) as s:
        _, from_jsonl, _ = colgrid(capsys, "eval", INDEX, str(jsonl), "--target", s.target)
        code, from_beir, err = colgrid(capsys, "eval", INDEX, str(beir_queries), "--qrels", str(qrels),
                                       "--target", s.target)
    assert code == 0, err
    assert from_beir.splitlines()[0] == from_jsonl.splitlines()[0]  # the same query set name, too
    drop_latency = ("P50", "P95", "P99")
    assert {k: v for k, v in table(from_beir)["v1"].items() if k not in drop_latency} == \
        {k: v for k, v in table(from_jsonl)["v1"].items() if k not in drop_latency}


def test_a_bad_query_file_exits_1_naming_the_line(eval_versions, tmp_path, capsys):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"query_id": "q1", "query": "x", "relevant": {"abc": 1}}\n{"query_id": "q2"\n')
    code, out, err = colgrid(capsys, "eval", INDEX, str(path), "--target", "127.0.0.1:1")
    assert code == 1 and out == ""
    assert "dev.jsonl:2: not valid JSON" in err


def test_a_refused_evaluation_exits_1_with_the_server_reason(eval_versions, queries, tmp_path, capsys):
    path = write_jsonl(tmp_path / "dev.jsonl", queries[:3])
    with serving(eval_versions) as s:
        code, _, err = colgrid(capsys, "eval", INDEX, str(path), "--version", "v9", "--target", s.target)
    assert code == 1 and "NOT_FOUND" in err and "v9" in err


def test_rollout_promote_with_a_policy_exits_1_naming_the_failed_rule(eval_versions, queries, tmp_path, capsys):
    path = write_jsonl(tmp_path / "dev.jsonl", queries)
    with serving(eval_versions) as s:
        target = ("--target", s.target)
        assert colgrid(capsys, "eval", INDEX, str(path), "--version", "v1", "--version", "v2", "--version", "v3",
                       *target)[0] == 1  # at most two at a time
        for pair in (("v1", "v2"), ("v1", "v3")):
            assert colgrid(capsys, "eval", INDEX, str(path), "--version", pair[0], "--version", pair[1],
                           "--record", "--query-set", "dev", *target)[0] == 0
        assert colgrid(capsys, "rollout", "start", INDEX, "v2", "--percent", "10", *target)[0] == 0
        code, out, err = colgrid(capsys, "rollout", "promote", INDEX, "--max-ndcg-drop", "0.01", *target)
        assert code == 1 and out == ""
        assert "FAILED_PRECONDITION: rule max_ndcg_drop: canary v2 nDCG@10" in err
        assert s.client.get_rollout(INDEX).rollout.stable == "v1"

        assert colgrid(capsys, "rollout", "abort", INDEX, *target)[0] == 0
        assert colgrid(capsys, "rollout", "start", INDEX, "v3", "--percent", "10", *target)[0] == 0
        code, out, err = colgrid(capsys, "rollout", "promote", INDEX, "--max-ndcg-drop", "0.01", *target)
    assert code == 0, err
    shown = dict((key, value.strip()) for key, _, value in (line.partition(":") for line in out.splitlines()[:6]))
    assert (shown["stable"], shown["canary"], shown["previous_stable"]) == ("v3", "-", "v1")
