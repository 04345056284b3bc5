"""Evaluation results stored on a version: metric name -> value for a named query set."""
from __future__ import annotations

from datetime import timezone
from pathlib import Path

import pytest

from colgrid_registry import (
    IndexNotFound, InvalidValue, Registry, VersionNotFound, VersionNotReady, open_registry)

SHA = "12" * 32
ENCODER = {"encoder_id": "enc-123", "encoder_kind": "colbert", "dim": 384, "storage_uri": "/x",
           "build_params": {}}


@pytest.fixture
def reg(tmp_path: Path):
    """Index "docs" with READY versions v1 and v2."""
    with open_registry(tmp_path / "registry.db") as registry:
        registry.create_index("docs")
        for _ in range(2):
            version = registry.allocate_version("docs", **ENCODER).version
            registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)
        yield registry


def test_a_recorded_evaluation_reads_back_unchanged(reg: Registry) -> None:
    record = reg.record_evaluation("docs", "v1", metrics={"ndcg@10": 0.61, "recall@100": 0.93},
                                   query_set="beir-scifact-dev", actor="alice")
    assert (record.index, record.version, record.query_set, record.actor) == (
        "docs", "v1", "beir-scifact-dev", "alice")
    assert record.metrics == {"ndcg@10": 0.61, "recall@100": 0.93}
    assert record.at.tzinfo == timezone.utc
    assert reg.evaluations("docs", "v1") == [record]


def test_integer_metrics_are_stored_as_floats(reg: Registry) -> None:
    record = reg.record_evaluation("docs", "v1", metrics={"queries": 300}, query_set="qs")
    assert type(record.metrics["queries"]) is float and record.metrics["queries"] == 300.0


def test_evaluations_are_per_version_and_newest_first(reg: Registry) -> None:
    first = reg.record_evaluation("docs", "v1", metrics={"mrr@10": 0.1}, query_set="a")
    reg.record_evaluation("docs", "v2", metrics={"mrr@10": 0.2}, query_set="a")
    third = reg.record_evaluation("docs", "v1", metrics={"mrr@10": 0.3}, query_set="b")
    assert reg.evaluations("docs", "v1") == [third, first]
    assert [e.metrics["mrr@10"] for e in reg.evaluations("docs", "v2")] == [0.2]


def test_a_version_without_evaluations_has_an_empty_list(reg: Registry) -> None:
    assert reg.evaluations("docs", "v2") == []


@pytest.mark.parametrize("state", ["BUILDING", "FAILED"])
def test_a_version_that_never_became_ready_cannot_be_evaluated(reg: Registry, state: str) -> None:
    version = reg.allocate_version("docs", **ENCODER).version
    if state == "FAILED":
        reg.mark_failed("docs", version, "boom")
    with pytest.raises(VersionNotReady, match=f"{state}.*only a READY version can be evaluated"):
        reg.record_evaluation("docs", version, metrics={"ndcg@10": 0.5}, query_set="qs")
    assert reg.evaluations("docs", version) == []


def test_a_retired_version_keeps_its_evaluations(reg: Registry) -> None:
    record = reg.record_evaluation("docs", "v1", metrics={"ndcg@10": 0.5}, query_set="qs")
    reg.mark_retired("docs", "v1")
    assert reg.evaluations("docs", "v1") == [record]


def test_unknown_versions_and_indexes_raise_not_found(reg: Registry) -> None:
    with pytest.raises(VersionNotFound):
        reg.record_evaluation("docs", "v9", metrics={"x": 1.0}, query_set="qs")
    with pytest.raises(VersionNotFound):
        reg.evaluations("docs", "v9")
    with pytest.raises(IndexNotFound):
        reg.evaluations("nope", "v1")


@pytest.mark.parametrize("metrics", [{}, {"ndcg@10": float("nan")}, {"ndcg@10": float("inf")},
                                     {"ndcg@10": "0.5"}, {"ndcg@10": True}, {"": 0.5}, [("ndcg@10", 0.5)]])
def test_malformed_metrics_are_refused(reg: Registry, metrics: object) -> None:
    with pytest.raises(InvalidValue) as caught:
        reg.record_evaluation("docs", "v1", metrics=metrics, query_set="qs")
    assert caught.value.field == "metrics"
    assert reg.evaluations("docs", "v1") == []


@pytest.mark.parametrize("field, value", [("query_set", ""), ("actor", " ")])
def test_an_empty_query_set_or_actor_is_refused(reg: Registry, field: str, value: str) -> None:
    kwargs = {"query_set": "qs", "actor": "alice", field: value}
    with pytest.raises(InvalidValue) as caught:
        reg.record_evaluation("docs", "v1", metrics={"x": 1.0}, **kwargs)
    assert caught.value.field == field


def test_evaluations_survive_reopening_the_registry(reg: Registry) -> None:
    record = reg.record_evaluation("docs", "v2", metrics={"ndcg@10": 0.7}, query_set="qs")
    with open_registry(reg.path) as reopened:
        assert reopened.evaluations("docs", "v2") == [record]
