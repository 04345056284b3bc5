"""Plain-text views the CLI prints for `colgrid registry list|show`, `colgrid rollout
status|history` and `colgrid eval`."""
from __future__ import annotations

import re
from datetime import datetime, timezone

from colgrid_registry import (
    AuditEntry, EvaluationRecord, IndexRecord, ReplicaRecord, Rollout, VersionRecord, VersionState)
from colgrid_registry.format import (
    format_audit, format_evaluations, format_indexes, format_replicas, format_rollout, format_version,
    format_versions)

AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


def version(name: str, state: VersionState = VersionState.READY, **overrides) -> VersionRecord:
    fields = dict(index="docs", version=name, state=state, encoder_id="enc-123", encoder_kind="colbert",
                  dim=384, documents=12, tokens=3456, storage_uri=f"/data/docs/{name}",
                  build_params={"nprobe": 4}, manifest_sha256="ab" * 32, created_at=AT, updated_at=AT,
                  error=None)
    return VersionRecord(**{**fields, **overrides})


def rollout(**pointers) -> Rollout:
    fields = dict(index="docs", stable=None, canary=None, canary_percent=0, shadow=None, shadow_percent=0,
                  previous_stable=None, generation=0, updated_at=AT)
    return Rollout(**{**fields, **pointers})


def row_for(table: str, first_cell: str) -> str:
    return next(line for line in table.splitlines()[1:] if line.split()[0] == first_cell)


def test_index_table_shows_each_index_with_its_pointers_and_generation() -> None:
    table = format_indexes(
        [IndexRecord("docs", AT), IndexRecord("empty", AT)],
        {"docs": rollout(stable="v2", previous_stable="v1", canary="v3", canary_percent=10, generation=4),
         "empty": rollout(index="empty")})
    assert table.splitlines()[0].split() == ["INDEX", "STABLE", "CANARY", "SHADOW", "PREVIOUS",
                                             "GENERATION", "CREATED"]
    assert row_for(table, "docs").split() == ["docs", "v2", "v3", "(10%)", "-", "v1", "4", "2025-03-04",
                                              "05:06:07Z"]
    assert row_for(table, "empty").split()[:6] == ["empty", "-", "-", "-", "-", "0"]


def test_version_table_marks_the_stable_version() -> None:
    table = format_versions([version("v1"), version("v2"), version("v3", VersionState.BUILDING,
                                                                       documents=None, tokens=None)],
                            rollout(stable="v2", previous_stable="v1"))
    lines = table.splitlines()
    assert [line.startswith("*") for line in lines[1:]] == [False, True, False]
    assert "stable" in lines[2] and "previous" in lines[1]
    assert lines[3].split()[:2] == ["v3", "BUILDING"] and lines[3].split()[5:7] == ["-", "-"]


def test_version_table_without_rollout_marks_nothing() -> None:
    assert "*" not in format_versions([version("v1")], None)


def test_empty_listings_say_so() -> None:
    assert format_indexes([], {}) == "(no indexes)"
    assert format_versions([], None) == "(no versions)"


def test_version_details_list_every_field() -> None:
    text = format_version(version("v4", VersionState.FAILED, error="disk full", manifest_sha256=None))
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert {k: v.strip() for k, v in fields.items()} == {
        "index": "docs", "version": "v4", "state": "FAILED", "encoder_id": "enc-123",
        "encoder_kind": "colbert", "dim": "384", "documents": "12", "tokens": "3456",
        "storage_uri": "/data/docs/v4", "manifest_sha256": "-", "build_params": '{"nprobe": 4}',
        "created_at": "2025-03-04 05:06:07Z", "updated_at": "2025-03-04 05:06:07Z", "error": "disk full"}


def cells(row: str) -> list[str]:
    """The cells of a table row (columns are separated by at least two spaces)."""
    return re.split(r"\s{2,}", row.strip())


def fields_of(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def test_rollout_status_shows_every_pointer_with_its_percent() -> None:
    text = format_rollout(rollout(stable="v2", canary="v3", canary_percent=10, shadow="v4", shadow_percent=100,
                                  previous_stable="v1", generation=7))
    assert fields_of(text) == {"index": "docs", "generation": "7", "stable": "v2", "canary": "v3 (10%)",
                               "shadow": "v4 (100%)", "previous_stable": "v1",
                               "updated_at": "2025-03-04 05:06:07Z"}


def test_empty_rollout_status_shows_dashes() -> None:
    fields = fields_of(format_rollout(rollout()))
    assert [fields[k] for k in ("stable", "canary", "shadow", "previous_stable")] == ["-"] * 4


def audit_entry(action: str, before: dict, after: dict, reason: str = "") -> AuditEntry:
    return AuditEntry(id=1, index="docs", at=AT, actor="alice", action=action, reason=reason,
                      before=rollout(**before).pointers(), after=rollout(**after).pointers())


def test_audit_history_shows_generation_action_actor_changed_pointers_and_reason() -> None:
    entry = audit_entry("start_canary", {"stable": "v1", "generation": 3},
                        {"stable": "v1", "canary": "v2", "canary_percent": 10, "generation": 4},
                        reason="try the\nnew encoder")
    header, row = format_audit([entry]).splitlines()
    assert header.split() == ["GEN", "AT", "ACTION", "ACTOR", "CHANGES", "REASON"]
    assert cells(row) == ["4", "2025-03-04 05:06:07Z", "start_canary", "alice",
                          "canary: - -> v2; canary_percent: 0 -> 10", "try the new encoder"]


def test_audit_history_keeps_the_order_given_and_marks_an_empty_reason() -> None:
    entries = [audit_entry("rollback", {"stable": "v2", "previous_stable": "v1", "generation": 5},
                           {"stable": "v1", "previous_stable": "v2", "generation": 6}),
               audit_entry("promote", {"stable": "v1", "canary": "v2", "canary_percent": 50, "generation": 4},
                           {"stable": "v2", "previous_stable": "v1", "generation": 5})]
    rows = format_audit(entries).splitlines()[1:]
    assert [cells(row)[2] for row in rows] == ["rollback", "promote"]
    assert cells(rows[0])[4:] == ["stable: v2 -> v1; previous_stable: v1 -> v2", "-"]


def replica(replica_id: str, served: dict, live: bool = True) -> ReplicaRecord:
    return ReplicaRecord(replica_id, f"{replica_id}.local:50051", AT, served, live)


def test_replica_table_shows_liveness_and_served_generations() -> None:
    table = format_replicas([replica("a", {"faq": 2, "docs": 7}), replica("b", {}, live=False)])
    header, a, b = table.splitlines()
    assert header.split() == ["REPLICA", "ADDRESS", "STATE", "LAST", "SEEN", "SERVES"]
    assert a.split() == ["a", "a.local:50051", "live", "2025-03-04", "05:06:07Z", "docs@7,", "faq@2"]
    assert b.split()[2] == "stale" and b.split()[-1] == "-"


def test_replica_table_with_a_rollout_says_which_replicas_acknowledged_it() -> None:
    table = format_replicas([replica("a", {"docs": 8}), replica("b", {"docs": 7}), replica("c", {"faq": 9})],
                            rollout=rollout(generation=7 + 1))
    lines = table.splitlines()
    assert lines[0].split()[-1] == "ACK"
    assert [cells(line)[-1] for line in lines[1:]] == ["yes", "no (serves 7)", "no (not serving)"]


def test_evaluation_table_lists_metrics_sorted_by_name() -> None:
    record = EvaluationRecord(id=1, index="docs", version="v2", query_set="scifact-dev",
                              metrics={"recall@100": 0.93, "ndcg@10": 0.61234, "queries": 300.0}, at=AT,
                              actor="bob")
    header, row = format_evaluations([record]).splitlines()
    assert header.split() == ["AT", "QUERY", "SET", "ACTOR", "METRICS"]
    assert row.split()[2:] == ["scifact-dev", "bob", "ndcg@10=0.6123", "queries=300", "recall@100=0.93"]


def test_empty_rollout_views_say_so() -> None:
    assert format_audit([]) == "(no rollout changes)"
    assert format_replicas([]) == "(no replicas)"
    assert format_evaluations([]) == "(no evaluations)"
