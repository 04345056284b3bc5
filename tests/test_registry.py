"""Registry catalog and rollout behaviour, on real SQLite files."""
from __future__ import annotations

from datetime import timezone
from pathlib import Path

import pytest

from colgrid_registry import (
    AlreadyExists, GenerationConflict, IndexNotFound, InvalidName, InvalidTransition, InvalidValue,
    Registry, RegistryError, VersionNotFound, VersionNotReady, VersionState, open_registry)

SHA = "ab" * 32
ENCODER = {"encoder_id": "enc-123", "encoder_kind": "colbert", "dim": 384}


@pytest.fixture
def registry(tmp_path: Path):
    with open_registry(tmp_path / "registry.db") as reg:
        reg.create_index("docs")
        yield reg


def allocate(reg: Registry, index: str = "docs", **build_params) -> str:
    return reg.allocate_version(index, storage_uri=f"/data/{index}/tmp", build_params=build_params,
                                **ENCODER).version


def ready(reg: Registry, index: str = "docs") -> str:
    version = allocate(reg, index)
    reg.mark_ready(index, version, documents=3, tokens=30, manifest_sha256=SHA)
    return version


# -- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["docs", "a", "v1", "my-index_2.0", "0" * 63])
def test_valid_index_names_are_accepted(registry: Registry, name: str) -> None:
    assert registry.ensure_index(name).name == name


@pytest.mark.parametrize("name", ["", "..", ".", "../etc", "a/b", "a\\b", "a..b", "Docs", "-docs",
                                  "_docs", ".hidden", "a b", "é", "x" * 64, "docs\n"])
def test_invalid_index_names_are_refused(registry: Registry, name: str) -> None:
    with pytest.raises(InvalidName, match="invalid index name"):
        registry.create_index(name)
    assert [i.name for i in registry.list_indexes()] == ["docs"]


def test_invalid_name_is_a_value_error_that_says_why(registry: Registry) -> None:
    with pytest.raises(ValueError, match="path separators"):
        registry.create_index("../secrets")


def test_version_names_are_validated_too(registry: Registry) -> None:
    with pytest.raises(InvalidName, match="invalid version name"):
        registry.create_version("docs", "../v1", storage_uri="/x", build_params={}, **ENCODER)


# -- indexes ---------------------------------------------------------------------------------------

def test_create_index_twice_raises_already_exists(registry: Registry) -> None:
    with pytest.raises(AlreadyExists):
        registry.create_index("docs")


def test_ensure_index_returns_the_existing_record(registry: Registry) -> None:
    assert registry.ensure_index("docs") == registry.get_index("docs")


def test_index_timestamps_are_timezone_aware_utc(registry: Registry) -> None:
    assert registry.get_index("docs").created_at.tzinfo == timezone.utc


def test_list_indexes_is_sorted_by_name(registry: Registry) -> None:
    registry.create_index("zeta")
    registry.create_index("alpha")
    assert [i.name for i in registry.list_indexes()] == ["alpha", "docs", "zeta"]


def test_unknown_index_raises_index_not_found_which_is_a_lookup_error(registry: Registry) -> None:
    with pytest.raises(IndexNotFound) as caught:
        registry.get_index("nope")
    assert isinstance(caught.value, LookupError) and caught.value.resource_name == "nope"


def test_new_index_has_an_empty_rollout_at_generation_zero(registry: Registry) -> None:
    rollout = registry.get_rollout("docs")
    assert (rollout.stable, rollout.canary, rollout.shadow, rollout.previous_stable) == (None,) * 4
    assert (rollout.canary_percent, rollout.shadow_percent, rollout.generation) == (0, 0, 0)


# -- versions --------------------------------------------------------------------------------------

def test_allocated_versions_are_numbered_per_index(registry: Registry) -> None:
    registry.create_index("other")
    assert [allocate(registry) for _ in range(3)] == ["v1", "v2", "v3"]
    assert allocate(registry, "other") == "v1"


def test_allocated_version_starts_building_with_its_parameters(registry: Registry) -> None:
    version = registry.allocate_version("docs", storage_uri="/data/docs/tmp", build_params={"nprobe": 4},
                                        **ENCODER)
    assert version.state is VersionState.BUILDING
    assert (version.encoder_id, version.dim, version.build_params) == ("enc-123", 384, {"nprobe": 4})
    assert (version.documents, version.tokens, version.manifest_sha256, version.error) == (None,) * 4


def test_allocation_skips_past_an_explicit_vn_name(registry: Registry) -> None:
    registry.create_version("docs", "v7", storage_uri="/x", build_params={}, **ENCODER)
    assert allocate(registry) == "v8"


def test_create_version_with_a_taken_name_raises_already_exists(registry: Registry) -> None:
    allocate(registry)
    with pytest.raises(AlreadyExists):
        registry.create_version("docs", "v1", storage_uri="/x", build_params={}, **ENCODER)


def test_version_of_unknown_index_raises_index_not_found(registry: Registry) -> None:
    with pytest.raises(IndexNotFound):
        allocate(registry, "missing")


def test_unknown_version_raises_version_not_found(registry: Registry) -> None:
    with pytest.raises(VersionNotFound, match="'v9'"):
        registry.get_version("docs", "v9")


def test_build_params_must_be_json_serialisable(registry: Registry) -> None:
    with pytest.raises(InvalidValue) as caught:
        allocate(registry, bad=object())
    assert caught.value.field == "build_params"
    assert registry.list_versions("docs") == []


def test_list_versions_is_in_creation_order(registry: Registry) -> None:
    registry.create_version("docs", "zzz", storage_uri="/x", build_params={}, **ENCODER)
    allocate(registry)
    registry.create_version("docs", "aaa", storage_uri="/x", build_params={}, **ENCODER)
    assert [v.version for v in registry.list_versions("docs")] == ["zzz", "v1", "aaa"]


def test_latest_ready_is_the_newest_ready_version(registry: Registry) -> None:
    assert registry.latest_ready("docs") is None
    first = ready(registry)
    second = ready(registry)
    allocate(registry)  # BUILDING, newer but not ready
    registry.mark_retired("docs", first)
    assert registry.latest_ready("docs").version == second


# -- transitions -----------------------------------------------------------------------------------

def test_mark_ready_records_counts_checksum_and_published_uri(registry: Registry) -> None:
    version = allocate(registry)
    record = registry.mark_ready("docs", version, documents=5, tokens=50, manifest_sha256=SHA,
                                 storage_uri="/data/docs/v1")
    assert record.state is VersionState.READY
    assert (record.documents, record.tokens, record.manifest_sha256, record.storage_uri) == (
        5, 50, SHA, "/data/docs/v1")
    assert record.updated_at >= record.created_at


def test_storage_uri_may_wait_until_mark_ready(registry: Registry) -> None:
    version = registry.allocate_version("docs", storage_uri="", build_params={}, **ENCODER)
    assert version.storage_uri is None
    record = registry.mark_ready("docs", version.version, documents=1, tokens=1, manifest_sha256=SHA,
                                 storage_uri="/data/docs/v1")
    assert record.storage_uri == "/data/docs/v1"


def test_mark_ready_without_any_storage_uri_is_refused(registry: Registry) -> None:
    version = registry.allocate_version("docs", storage_uri=None, build_params={}, **ENCODER).version
    with pytest.raises(InvalidValue, match="storage_uri"):
        registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)
    assert registry.get_version("docs", version).state is VersionState.BUILDING


def test_mark_failed_keeps_the_error(registry: Registry) -> None:
    version = allocate(registry)
    record = registry.mark_failed("docs", version, "out of disk")
    assert (record.state, record.error) == (VersionState.FAILED, "out of disk")


def test_ready_version_can_be_retired(registry: Registry) -> None:
    version = ready(registry)
    assert registry.mark_retired("docs", version).state is VersionState.RETIRED


@pytest.mark.parametrize("setup, action", [
    ("ready", "ready"), ("ready", "failed"), ("failed", "ready"), ("failed", "retired"),
    ("building", "retired"), ("retired", "ready"), ("retired", "retired"),
])
def test_invalid_transitions_are_refused_and_change_nothing(registry: Registry, setup: str,
                                                            action: str) -> None:
    version = allocate(registry)
    if setup in ("ready", "retired"):
        registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)
    if setup == "retired":
        registry.mark_retired("docs", version)
    if setup == "failed":
        registry.mark_failed("docs", version, "boom")
    before = registry.get_version("docs", version)
    with pytest.raises(InvalidTransition):
        {"ready": lambda: registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA),
         "failed": lambda: registry.mark_failed("docs", version, "again"),
         "retired": lambda: registry.mark_retired("docs", version)}[action]()
    assert registry.get_version("docs", version) == before


def test_stable_version_cannot_be_retired(registry: Registry) -> None:
    version = ready(registry)
    registry.set_stable("docs", version)
    with pytest.raises(InvalidTransition, match="stable"):
        registry.mark_retired("docs", version)
    assert registry.get_version("docs", version).state is VersionState.READY


def test_previous_stable_version_can_be_retired(registry: Registry) -> None:
    old, new = ready(registry), ready(registry)
    registry.set_stable("docs", old)
    registry.set_stable("docs", new)
    assert registry.mark_retired("docs", old).state is VersionState.RETIRED


def test_mark_ready_refuses_a_malformed_checksum(registry: Registry) -> None:
    version = allocate(registry)
    with pytest.raises(InvalidValue, match="manifest_sha256"):
        registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256="nothex")
    assert registry.get_version("docs", version).state is VersionState.BUILDING


# -- rollouts --------------------------------------------------------------------------------------

def test_set_stable_points_at_a_ready_version_and_bumps_generation(registry: Registry) -> None:
    version = ready(registry)
    rollout = registry.set_stable("docs", version)
    assert (rollout.stable, rollout.generation) == (version, 1)
    assert registry.get_rollout("docs") == rollout


@pytest.mark.parametrize("state", ["BUILDING", "FAILED", "RETIRED"])
def test_set_stable_refuses_a_version_that_is_not_ready(registry: Registry, state: str) -> None:
    version = allocate(registry)
    if state == "FAILED":
        registry.mark_failed("docs", version, "boom")
    if state == "RETIRED":
        registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)
        registry.mark_retired("docs", version)
    with pytest.raises(VersionNotReady, match=state):
        registry.set_stable("docs", version)
    assert registry.get_rollout("docs").generation == 0
    assert registry.audit_log("docs") == []


def test_set_stable_on_unknown_version_raises_version_not_found(registry: Registry) -> None:
    with pytest.raises(VersionNotFound):
        registry.set_stable("docs", "v42")


def test_set_stable_keeps_the_old_stable_as_previous_stable(registry: Registry) -> None:
    first, second, third = ready(registry), ready(registry), ready(registry)
    assert registry.set_stable("docs", first).previous_stable is None
    assert registry.set_stable("docs", second).previous_stable == first
    assert registry.set_stable("docs", third).previous_stable == second


def test_set_stable_to_the_current_stable_changes_nothing(registry: Registry) -> None:
    version = ready(registry)
    first = registry.set_stable("docs", version)
    assert registry.set_stable("docs", version) == first
    assert len(registry.audit_log("docs")) == 1


def test_set_stable_with_the_current_generation_succeeds(registry: Registry) -> None:
    version = ready(registry)
    assert registry.set_stable("docs", version, expected_generation=0).generation == 1


def test_generation_conflict_raises_and_leaves_the_rollout_unchanged(registry: Registry) -> None:
    first, second = ready(registry), ready(registry)
    registry.set_stable("docs", first)
    before, audit_before = registry.get_rollout("docs"), registry.audit_log("docs")
    with pytest.raises(GenerationConflict) as caught:
        registry.set_stable("docs", second, expected_generation=0)
    assert (caught.value.expected, caught.value.actual) == (0, 1)
    assert registry.get_rollout("docs") == before
    assert registry.audit_log("docs") == audit_before


def test_set_stable_writes_an_audit_entry_with_before_and_after(registry: Registry) -> None:
    first, second = ready(registry), ready(registry)
    registry.set_stable("docs", first)
    registry.set_stable("docs", second, actor="alice", reason="better recall")
    entry = registry.audit_log("docs")[0]
    assert (entry.actor, entry.action, entry.reason) == ("alice", "set_stable", "better recall")
    assert (entry.before["stable"], entry.before["generation"]) == (first, 1)
    assert (entry.after["stable"], entry.after["previous_stable"], entry.after["generation"]) == (
        second, first, 2)
    assert entry.at.tzinfo == timezone.utc


def test_audit_log_is_newest_first_limited_and_per_index(registry: Registry) -> None:
    registry.create_index("other")
    versions = [ready(registry) for _ in range(3)]
    for version in versions:
        registry.set_stable("docs", version)
    registry.set_stable("other", ready(registry, "other"))
    entries = registry.audit_log("docs", limit=2)
    assert [e.after["stable"] for e in entries] == [versions[2], versions[1]]
    assert [e.index for e in registry.audit_log("other")] == ["other"]


def test_set_stable_refuses_an_empty_actor(registry: Registry) -> None:
    version = ready(registry)
    with pytest.raises(InvalidValue, match="actor"):
        registry.set_stable("docs", version, actor="")
    assert registry.get_rollout("docs").stable is None


# -- persistence and lifecycle -----------------------------------------------------------------------

def test_reopening_the_file_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with open_registry(path) as reg:
        reg.create_index("docs")
        old, new = ready(reg), ready(reg)
        reg.set_stable("docs", old)
        reg.set_stable("docs", new, actor="bob", reason="r")
        failed = allocate(reg)
        reg.mark_failed("docs", failed, "boom")
        snapshot = (reg.list_indexes(), reg.list_versions("docs"), reg.get_rollout("docs"),
                    reg.audit_log("docs"))
    with open_registry(path) as reopened:
        assert (reopened.list_indexes(), reopened.list_versions("docs"), reopened.get_rollout("docs"),
                reopened.audit_log("docs")) == snapshot


def test_closed_registry_refuses_calls(tmp_path: Path) -> None:
    reg = open_registry(tmp_path / "registry.db")
    reg.close()
    reg.close()  # idempotent
    with pytest.raises(RegistryError, match="closed"):
        reg.list_indexes()
