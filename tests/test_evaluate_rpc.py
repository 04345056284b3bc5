"""EvaluationService.Evaluate on a live server: judged queries run on pinned versions, scored,
and recorded on the versions in the registry on request."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from colgrid_client import (
    AsyncClient, DeadlineExceededError, EvalQuery, FailedPreconditionError, InvalidArgumentError, NotFoundError)
from colgrid_server.evaluation import ndcg_at, recall_at, reciprocal_rank_at
from tests.test_evaluation_support import (  # noqa: F401 - fixtures
    DEGRADED, INDEX, JUDGED, eval_template, eval_versions, queries, rollout_documents, serving, tiny_checkpoint,
    tiny_encoder_dir)


def test_the_degraded_version_scores_lower_on_every_relevance_metric(eval_versions, queries):
    with serving(eval_versions) as s:
        full, degraded = s.client.evaluate(INDEX, queries, versions=["v1", "v2"])
    assert (full.version, degraded.version) == ("v1", "v2")
    assert full.queries == degraded.queries == JUDGED and full.k == degraded.k == 100
    assert full.ndcg_at_10 > degraded.ndcg_at_10 + 0.1
    assert full.recall_at_k > degraded.recall_at_k
    assert full.mrr_at_10 > degraded.mrr_at_10
    assert full.judged_missing == 0 and degraded.judged_missing >= JUDGED - DEGRADED
    assert 0 < full.latency_p50_ms <= full.latency_p95_ms <= full.latency_p99_ms


def test_scores_are_the_means_of_the_metrics_of_what_search_returns(eval_versions, queries):
    """The same default knobs on the stable version: Search's rankings, scored by hand, give
    the evaluation's numbers."""
    with serving(eval_versions) as s:
        (result,) = s.client.evaluate(INDEX, queries, versions=["v1"], k=20)
        rankings = [[h.doc_id for h in s.client.search(INDEX, q["query"], k=20)] for q in queries]
    ndcg = [ndcg_at(r, q["relevant"]) for r, q in zip(rankings, queries)]
    recall = [recall_at(r, q["relevant"], 20) for r, q in zip(rankings, queries)]
    rr = [reciprocal_rank_at(r, q["relevant"]) for r, q in zip(rankings, queries)]
    assert result.ndcg_at_10 == pytest.approx(sum(ndcg) / len(ndcg))
    assert result.recall_at_k == pytest.approx(sum(recall) / len(recall)) and result.k == 20
    assert result.mrr_at_10 == pytest.approx(sum(rr) / len(rr))
    assert result.metrics["recall@20"] == result.recall_at_k and result.metrics["queries"] == JUDGED


def test_without_versions_it_evaluates_stable_and_the_running_canary(eval_versions, queries):
    with serving(eval_versions) as s:
        alone = s.client.evaluate(INDEX, queries[:5])
        s.client.start_canary(INDEX, "v2", 10)
        both = s.client.evaluate(INDEX, queries[:5])
    assert [r.version for r in alone] == ["v1"]
    assert [r.version for r in both] == ["v1", "v2"]


def test_recorded_results_show_up_on_the_versions(eval_versions, queries):
    with serving(eval_versions) as s:
        results = s.client.evaluate(INDEX, queries, versions=["v2", "v1"], query_set="dev", record=True)
        v1, v2 = s.client.get_version(INDEX, "v1"), s.client.get_version(INDEX, "v2")
        listed = {v.version: v for v in s.client.list_versions(INDEX)}
        stored = s.registry.evaluations(INDEX, "v2")
    assert [e.query_set for e in v1.evaluations] == ["dev"] and len(v2.evaluations) == 1
    assert v2.evaluations[0] == results[0] and v1.evaluations[0] == results[1]
    assert results[0].evaluated_at and results[0].evaluated_at == stored[0].at.isoformat()
    assert stored[0].metrics["ndcg@10"] == results[0].ndcg_at_10 and stored[0].actor == "api"
    assert listed["v1"].evaluations == v1.evaluations and listed["v3"].evaluations == ()


def test_results_are_not_stored_unless_asked(eval_versions, queries):
    with serving(eval_versions) as s:
        s.client.evaluate(INDEX, queries[:5], versions=["v1"])
        assert s.client.get_version(INDEX, "v1").evaluations == ()


def test_an_unnamed_query_set_is_named_by_a_digest_of_its_judged_queries(eval_versions, queries):
    changed = [{**queries[0], "relevant": {"abc": 1.0}}, *queries[1:5]]
    with serving(eval_versions) as s:
        first = s.client.evaluate(INDEX, queries[:5], versions=["v1"])[0].query_set
        again = s.client.evaluate(INDEX, queries[:5], versions=["v1"])[0].query_set
        other = s.client.evaluate(INDEX, changed, versions=["v1"])[0].query_set
    assert first.startswith("sha256:") and first == again != other


def test_a_version_that_is_not_loaded_is_loaded_for_the_run_and_unloaded_after(eval_versions, queries):
    with serving(eval_versions) as s:
        (twin,) = s.client.evaluate(INDEX, queries, versions=["v3"])
        (stable,) = s.client.evaluate(INDEX, queries, versions=["v1"])
        held = [v.version for v in s.state.versions_held(INDEX)]
    assert twin.ndcg_at_10 == stable.ndcg_at_10 and twin.recall_at_k == stable.recall_at_k
    assert held == ["v1"]


def test_query_vectors_score_like_the_text_they_encode(eval_versions, queries):
    with serving(eval_versions) as s:
        vectors = [EvalQuery(q["query_id"], relevant=q["relevant"],
                             query_vectors=s.client.encode_query(INDEX, q["query"])) for q in queries[:10]]
        (by_text,) = s.client.evaluate(INDEX, queries[:10], versions=["v1"])
        (by_vectors,) = s.client.evaluate(INDEX, vectors, versions=["v1"])
    assert by_vectors.ndcg_at_10 == pytest.approx(by_text.ndcg_at_10)
    assert by_vectors.query_set != by_text.query_set


def test_the_async_client_evaluates_too(eval_versions, queries):
    async def run(target: str):
        async with AsyncClient(target, timeout=60, retries=0) as client:
            return await client.evaluate(INDEX, queries[:5], versions=["v1", "v2"])

    with serving(eval_versions) as s:
        results = asyncio.run(run(s.target))
    assert [r.version for r in results] == ["v1", "v2"]


def test_a_caller_that_gives_up_stops_the_run_and_nothing_is_recorded(eval_versions, queries):
    """Thousands of searches cannot finish in 0.3 s: the deadline cancels the call, the worker
    stops at its next query and releases the version, and the unfinished run records nothing."""
    many = [{**queries[i % len(queries)], "query_id": f"q{i}"} for i in range(4000)]
    with serving(eval_versions) as s:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            s.client.evaluate(INDEX, many, versions=["v1", "v2"], record=True, timeout=0.3)
        while any(v.in_flight for v in s.state.versions_held(INDEX)) and time.monotonic() - started < 5:
            time.sleep(0.02)
        released_after = time.monotonic() - started
        assert s.registry.evaluations(INDEX, "v1") == [] and s.registry.evaluations(INDEX, "v2") == []
    assert released_after < 5


# --- refusals ----------------------------------------------------------------------------------

def test_an_empty_query_set_is_an_invalid_argument(eval_versions):
    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match="queries is empty") as info:
        s.client.evaluate(INDEX, [], versions=["v1"])
    assert [v.field for v in info.value.field_violations] == ["queries"]


def test_more_than_two_versions_is_an_invalid_argument(eval_versions, queries):
    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match="at most 2") as info:
        s.client.evaluate(INDEX, queries[:3], versions=["v1", "v2", "v3"])
    assert [v.field for v in info.value.field_violations] == ["versions"]


@pytest.mark.parametrize("bad, message", [
    ({"query_id": "q0", "query": "x", "relevant": {"abc": 0.0}}, "no relevant document"),
    ({"query_id": "q0", "query": "x", "relevant": {"abc": -1.0}}, "finite number >= 0"),
    ({"query_id": "q0", "query": " ", "relevant": {"abc": 1.0}}, "has no text"),
    ({"query_id": "", "query": "x", "relevant": {"abc": 1.0}}, "has no query_id"),
])
def test_a_query_that_cannot_be_scored_is_an_invalid_argument_naming_it(eval_versions, queries, bad, message):
    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match=message) as info:
        s.client.evaluate(INDEX, [*queries[1:3], bad], versions=["v1"])
    assert info.value.field_violations[0].field.startswith("queries[2]")


def test_a_repeated_query_id_is_an_invalid_argument(eval_versions, queries):
    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match="'q1' appears twice"):
        s.client.evaluate(INDEX, [queries[1], queries[1]], versions=["v1"])


def test_judgements_naming_no_document_of_the_version_are_an_invalid_argument(eval_versions):
    foreign = [{"query_id": "q", "query": "parse json", "relevant": {"not-a-doc": 1.0, "nor-this": 2.0}}]
    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match="none of the 2 relevant"):
        s.client.evaluate(INDEX, foreign, versions=["v1"])


def test_k_above_the_server_limit_is_an_invalid_argument(eval_versions, queries):
    with serving(eval_versions, max_k=50) as s, pytest.raises(InvalidArgumentError, match="limit of 50"):
        s.client.evaluate(INDEX, queries[:3], versions=["v1"], k=60)


def test_vectors_of_another_dimension_are_an_invalid_argument(eval_versions, queries):
    wrong = EvalQuery("q", relevant=queries[0]["relevant"], query_vectors=[[0.1] * 7, [0.2] * 7])
    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match="dim"):
        s.client.evaluate(INDEX, [wrong], versions=["v1"])


@pytest.mark.parametrize("index, versions, resource", [("nope", ["v1"], "nope"), (INDEX, ["v9"], "v9")])
def test_an_unknown_index_or_version_is_not_found(eval_versions, queries, index, versions, resource):
    with serving(eval_versions) as s, pytest.raises(NotFoundError) as info:
        s.client.evaluate(index, queries[:3], versions=versions)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and resource in str(info.value)


def test_a_version_that_is_not_ready_cannot_be_evaluated(eval_versions, queries):
    with serving(eval_versions) as s:
        s.registry.mark_retired(INDEX, "v3")
        with pytest.raises(FailedPreconditionError, match="ready") as info:
            s.client.evaluate(INDEX, queries[:3], versions=["v3"])
    assert info.value.error_metadata.get("check") == "ready"
