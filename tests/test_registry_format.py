"""Plain-text tables the CLI prints for `colgrid registry list|show`."""
from __future__ import annotations

from datetime import datetime, timezone

from colgrid_registry import IndexRecord, Rollout, VersionRecord, VersionState
from colgrid_registry.format import format_indexes, format_version, format_versions

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
