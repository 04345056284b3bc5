"""Rollout operations: canary, shadow, promote, rollback, abort — their refusals, compare-and-set
on generation, and the audit entry each one writes. Real SQLite files."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from colgrid_registry import (
    GenerationConflict, InvalidTransition, InvalidValue, Registry, Rollout, VersionNotFound,
    VersionNotReady, open_registry)

SHA = "ef" * 32
ENCODER = {"encoder_id": "enc-123", "encoder_kind": "colbert", "dim": 384, "storage_uri": "/x",
           "build_params": {}}


@pytest.fixture
def reg(tmp_path: Path):
    """Index "docs" with READY versions v1, v2, v3 and v1 stable (generation 1)."""
    with open_registry(tmp_path / "registry.db") as registry:
        registry.create_index("docs")
        for _ in range(3):
            ready(registry)
        registry.set_stable("docs", "v1")
        yield registry


def ready(registry: Registry, index: str = "docs") -> str:
    version = registry.allocate_version(index, **ENCODER).version
    registry.mark_ready(index, version, documents=1, tokens=1, manifest_sha256=SHA)
    return version


def building(registry: Registry, state: str) -> str:
    """A version of "docs" in `state` (BUILDING, FAILED or RETIRED)."""
    version = registry.allocate_version("docs", **ENCODER).version
    if state == "FAILED":
        registry.mark_failed("docs", version, "boom")
    if state == "RETIRED":
        registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)
        registry.mark_retired("docs", version)
    return version


def snapshot(registry: Registry) -> tuple[Rollout, list]:
    return registry.get_rollout("docs"), registry.audit_log("docs")


def pointers(rollout: Rollout) -> tuple:
    return (rollout.stable, rollout.canary, rollout.canary_percent, rollout.shadow, rollout.shadow_percent,
            rollout.previous_stable)


# Every rollout operation: (set-up bringing "docs" to a state where it is allowed, the operation).
OPERATIONS: dict[str, tuple[Callable[[Registry], object], Callable[..., Rollout]]] = {
    "set_stable": (lambda r: None, lambda r, **kw: r.set_stable("docs", "v2", **kw)),
    "start_canary": (lambda r: None, lambda r, **kw: r.start_canary("docs", "v2", 10, **kw)),
    "set_canary_percent": (lambda r: r.start_canary("docs", "v2", 10),
                           lambda r, **kw: r.set_canary_percent("docs", 50, **kw)),
    "set_shadow": (lambda r: None, lambda r, **kw: r.set_shadow("docs", "v3", 25, **kw)),
    "clear_shadow": (lambda r: r.set_shadow("docs", "v3"), lambda r, **kw: r.clear_shadow("docs", **kw)),
    "promote": (lambda r: r.start_canary("docs", "v2", 10), lambda r, **kw: r.promote("docs", **kw)),
    "rollback": (lambda r: r.set_stable("docs", "v2"), lambda r, **kw: r.rollback("docs", **kw)),
    "abort_canary": (lambda r: r.start_canary("docs", "v2", 10),
                     lambda r, **kw: r.abort_canary("docs", **kw)),
}


# -- every operation -------------------------------------------------------------------------------

@pytest.mark.parametrize("action", sorted(OPERATIONS))
def test_each_operation_bumps_generation_by_one_and_audits_before_and_after(reg: Registry,
                                                                            action: str) -> None:
    setup, operate = OPERATIONS[action]
    setup(reg)
    before, audit_before = snapshot(reg)
    after = operate(reg, actor="alice", reason="ticket 42")
    assert after.generation == before.generation + 1
    assert reg.get_rollout("docs") == after
    entries = reg.audit_log("docs")
    assert len(entries) == len(audit_before) + 1
    entry = entries[0]
    assert (entry.action, entry.actor, entry.reason) == (action, "alice", "ticket 42")
    assert (entry.before, entry.after) == (before.pointers(), after.pointers())


@pytest.mark.parametrize("action", sorted(OPERATIONS))
def test_each_operation_succeeds_with_the_current_generation(reg: Registry, action: str) -> None:
    setup, operate = OPERATIONS[action]
    setup(reg)
    current = reg.get_rollout("docs").generation
    assert operate(reg, expected_generation=current).generation == current + 1


@pytest.mark.parametrize("action", sorted(OPERATIONS))
def test_each_operation_with_a_stale_generation_conflicts_and_changes_nothing(reg: Registry,
                                                                              action: str) -> None:
    setup, operate = OPERATIONS[action]
    setup(reg)
    before, audit_before = snapshot(reg)
    with pytest.raises(GenerationConflict) as caught:
        operate(reg, expected_generation=before.generation - 1)
    assert (caught.value.expected, caught.value.actual) == (before.generation - 1, before.generation)
    assert snapshot(reg) == (before, audit_before)


@pytest.mark.parametrize("action", sorted(OPERATIONS))
@pytest.mark.parametrize("expected", [-1, "1", 1.0, True])
def test_each_operation_refuses_a_malformed_expected_generation(reg: Registry, action: str,
                                                                expected: object) -> None:
    setup, operate = OPERATIONS[action]
    setup(reg)
    before = snapshot(reg)
    with pytest.raises(InvalidValue) as caught:
        operate(reg, expected_generation=expected)
    assert caught.value.field == "expected_generation"
    assert snapshot(reg) == before


@pytest.mark.parametrize("action", sorted(OPERATIONS))
def test_each_operation_refuses_an_empty_actor(reg: Registry, action: str) -> None:
    setup, operate = OPERATIONS[action]
    setup(reg)
    before = snapshot(reg)
    with pytest.raises(InvalidValue, match="actor"):
        operate(reg, actor=" ")
    assert snapshot(reg) == before


# -- start_canary / set_canary_percent / abort_canary -------------------------------------------------

def test_start_canary_sends_a_percent_to_a_ready_version_beside_stable(reg: Registry) -> None:
    rollout = reg.start_canary("docs", "v2", 10)
    assert pointers(rollout) == ("v1", "v2", 10, None, 0, None)


@pytest.mark.parametrize("percent", [0, 100])
def test_canary_percent_bounds_are_accepted(reg: Registry, percent: int) -> None:
    assert reg.start_canary("docs", "v2", percent).canary_percent == percent


@pytest.mark.parametrize("percent", [-1, 101, 12.5, True, "10", None])
def test_start_canary_refuses_a_percent_outside_0_to_100(reg: Registry, percent: object) -> None:
    before = snapshot(reg)
    with pytest.raises(InvalidValue) as caught:
        reg.start_canary("docs", "v2", percent)
    assert caught.value.field == "percent"
    assert snapshot(reg) == before


@pytest.mark.parametrize("state", ["BUILDING", "FAILED", "RETIRED"])
def test_start_canary_refuses_a_version_that_is_not_ready(reg: Registry, state: str) -> None:
    version = building(reg, state)
    before = snapshot(reg)
    with pytest.raises(VersionNotReady, match=state):
        reg.start_canary("docs", version, 10)
    assert snapshot(reg) == before


def test_start_canary_of_an_unknown_version_raises_version_not_found(reg: Registry) -> None:
    with pytest.raises(VersionNotFound):
        reg.start_canary("docs", "v99", 10)


def test_start_canary_refuses_the_stable_version(reg: Registry) -> None:
    before = snapshot(reg)
    with pytest.raises(InvalidTransition, match="already the stable"):
        reg.start_canary("docs", "v1", 10)
    assert snapshot(reg) == before


def test_start_canary_refuses_while_a_canary_is_running(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 10)
    before = snapshot(reg)
    with pytest.raises(InvalidTransition, match="abort or promote the running canary first"):
        reg.start_canary("docs", "v3", 10)
    assert snapshot(reg) == before


def test_start_canary_refuses_an_index_without_stable(reg: Registry) -> None:
    reg.create_index("fresh")
    version = ready(reg, "fresh")
    with pytest.raises(InvalidTransition, match="no stable version"):
        reg.start_canary("fresh", version, 10)
    assert reg.get_rollout("fresh").generation == 0


def test_set_canary_percent_changes_only_the_percent(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 10)
    assert pointers(reg.set_canary_percent("docs", 60)) == ("v1", "v2", 60, None, 0, None)


def test_set_canary_percent_without_a_canary_is_refused(reg: Registry) -> None:
    before = snapshot(reg)
    with pytest.raises(InvalidTransition, match="no canary"):
        reg.set_canary_percent("docs", 50)
    assert snapshot(reg) == before


@pytest.mark.parametrize("percent", [-5, 250])
def test_set_canary_percent_refuses_a_percent_outside_0_to_100(reg: Registry, percent: int) -> None:
    reg.start_canary("docs", "v2", 10)
    with pytest.raises(InvalidValue, match="0 to 100"):
        reg.set_canary_percent("docs", percent)
    assert reg.get_rollout("docs").canary_percent == 10


def test_abort_canary_sends_all_traffic_back_to_stable(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 30)
    assert pointers(reg.abort_canary("docs")) == ("v1", None, 0, None, 0, None)


def test_abort_canary_without_a_canary_is_refused(reg: Registry) -> None:
    with pytest.raises(InvalidTransition, match="no canary"):
        reg.abort_canary("docs")


# -- shadow ----------------------------------------------------------------------------------------

def test_set_shadow_mirrors_all_queries_by_default(reg: Registry) -> None:
    assert pointers(reg.set_shadow("docs", "v3")) == ("v1", None, 0, "v3", 100, None)


def test_set_shadow_replaces_the_current_shadow(reg: Registry) -> None:
    reg.set_shadow("docs", "v3", 50)
    assert (reg.set_shadow("docs", "v2", 5).shadow, reg.get_rollout("docs").shadow_percent) == ("v2", 5)


def test_set_shadow_refuses_the_stable_version(reg: Registry) -> None:
    with pytest.raises(InvalidTransition, match="stable"):
        reg.set_shadow("docs", "v1")
    assert reg.get_rollout("docs").shadow is None


@pytest.mark.parametrize("state", ["BUILDING", "FAILED", "RETIRED"])
def test_set_shadow_refuses_a_version_that_is_not_ready(reg: Registry, state: str) -> None:
    version = building(reg, state)
    with pytest.raises(VersionNotReady):
        reg.set_shadow("docs", version)
    assert reg.get_rollout("docs").shadow is None


@pytest.mark.parametrize("percent", [-1, 101])
def test_set_shadow_refuses_a_percent_outside_0_to_100(reg: Registry, percent: int) -> None:
    with pytest.raises(InvalidValue) as caught:
        reg.set_shadow("docs", "v3", percent)
    assert caught.value.field == "percent"


def test_clear_shadow_empties_the_pointer_and_its_percent(reg: Registry) -> None:
    reg.set_shadow("docs", "v3", 40)
    assert pointers(reg.clear_shadow("docs")) == ("v1", None, 0, None, 0, None)


def test_clear_shadow_without_a_shadow_is_refused(reg: Registry) -> None:
    with pytest.raises(InvalidTransition, match="has none"):
        reg.clear_shadow("docs")


# -- promote / rollback ----------------------------------------------------------------------------

def test_promote_makes_the_canary_stable_and_keeps_the_old_stable_as_previous(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 25)
    assert pointers(reg.promote("docs")) == ("v2", None, 0, None, 0, "v1")


def test_promote_without_a_canary_is_refused(reg: Registry) -> None:
    before = snapshot(reg)
    with pytest.raises(InvalidTransition, match="no canary"):
        reg.promote("docs")
    assert snapshot(reg) == before


def test_promote_clears_a_shadow_of_the_promoted_version_only(reg: Registry) -> None:
    reg.set_shadow("docs", "v2")
    reg.start_canary("docs", "v2", 10)
    assert reg.promote("docs").shadow is None
    reg.set_shadow("docs", "v3", 20)
    reg.start_canary("docs", "v1", 10)
    assert (reg.promote("docs").shadow, reg.get_rollout("docs").shadow_percent) == ("v3", 20)


def test_rollback_swaps_stable_and_previous_stable(reg: Registry) -> None:
    reg.set_stable("docs", "v2")
    assert pointers(reg.rollback("docs")) == ("v1", None, 0, None, 0, "v2")


def test_promote_then_rollback_twice_returns_to_the_promoted_version(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 10)
    promoted = reg.promote("docs")
    assert reg.rollback("docs").stable == "v1"
    again = reg.rollback("docs")
    assert pointers(again) == pointers(promoted) == ("v2", None, 0, None, 0, "v1")
    assert again.generation == promoted.generation + 2


def test_rollback_ends_a_running_canary(reg: Registry) -> None:
    reg.set_stable("docs", "v2")
    reg.start_canary("docs", "v3", 10)
    assert pointers(reg.rollback("docs")) == ("v1", None, 0, None, 0, "v2")


def test_rollback_clears_a_shadow_of_the_version_it_restores(reg: Registry) -> None:
    reg.set_stable("docs", "v2")
    reg.set_shadow("docs", "v1")
    assert (reg.rollback("docs").stable, reg.get_rollout("docs").shadow) == ("v1", None)


def test_rollback_without_a_previous_stable_is_refused(reg: Registry) -> None:
    before = snapshot(reg)
    with pytest.raises(InvalidTransition, match="no previous stable"):
        reg.rollback("docs")
    assert snapshot(reg) == before


def test_rollback_onto_a_retired_previous_stable_is_refused_saying_what_to_do(reg: Registry) -> None:
    reg.set_stable("docs", "v2")
    reg.mark_retired("docs", "v1")
    before = snapshot(reg)
    with pytest.raises(VersionNotReady, match="'v1'.*RETIRED.*cannot roll back.*set_stable"):
        reg.rollback("docs")
    assert snapshot(reg) == before


def test_set_stable_onto_the_canary_ends_the_canary(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 10)
    assert pointers(reg.set_stable("docs", "v2")) == ("v2", None, 0, None, 0, "v1")


# -- retiring versions the rollout points at ------------------------------------------------------------

@pytest.mark.parametrize("role", ["canary", "shadow"])
def test_a_canary_or_shadow_version_cannot_be_retired(reg: Registry, role: str) -> None:
    if role == "canary":
        reg.start_canary("docs", "v2", 10)
    else:
        reg.set_shadow("docs", "v2")
    with pytest.raises(InvalidTransition, match=role):
        reg.mark_retired("docs", "v2")
    assert reg.get_version("docs", "v2").state.value == "READY"


def test_an_aborted_canary_version_can_be_retired(reg: Registry) -> None:
    reg.start_canary("docs", "v2", 10)
    reg.abort_canary("docs")
    assert reg.mark_retired("docs", "v2").state.value == "RETIRED"


# -- audit -----------------------------------------------------------------------------------------

def test_audit_log_replays_a_whole_rollout_in_order(reg: Registry) -> None:
    reg.set_shadow("docs", "v2", 50)
    reg.clear_shadow("docs")
    reg.start_canary("docs", "v2", 5)
    reg.set_canary_percent("docs", 50)
    reg.promote("docs")
    reg.rollback("docs")
    reg.start_canary("docs", "v3", 1)
    reg.abort_canary("docs")
    entries = list(reversed(reg.audit_log("docs")))
    assert [e.action for e in entries] == [
        "set_stable", "set_shadow", "clear_shadow", "start_canary", "set_canary_percent", "promote",
        "rollback", "start_canary", "abort_canary"]
    assert [e.after["generation"] for e in entries] == list(range(1, 10))
    assert all(e.before == prior.after for prior, e in zip(entries, entries[1:]))
