"""kill -9 at random points of index builds and rollouts leaves the registry on the old or the new
generation, never on an incomplete version (DESIGN.md "Registry and rollouts").

Twenty trials of scripts/fault_trials.py (the soak runs more): half SIGKILL a real `colgrid index
build` process, half SIGKILL a real `colgrid serve` process while a client streams rollout
changes to it, then restart it. The trials run once for the module; each test reads one
invariant off every trial.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from scripts.fault_trials import FaultReport, LabConfig, run_trials
from tests.test_rollout_support import tiny_checkpoint, tiny_encoder_dir  # noqa: F401 - fixtures

TRIALS = 20
DOCUMENTS = 200


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path) -> FaultReport:  # noqa: F811
    config = LabConfig(work_dir=tmp_path_factory.mktemp("faults"), documents=DOCUMENTS,
                       encoder_dir=tiny_encoder_dir, seed=4)
    return run_trials(config, trials=TRIALS, phases=("build", "rollout"))


def _by_phase(report: FaultReport, phase: str) -> list:
    return [t for t in report.trials if t.phase == phase]


def test_the_kills_interrupt_running_builds_and_servers_in_both_phases(report):
    builds, rollouts = _by_phase(report, "build"), _by_phase(report, "rollout")
    assert len(report.trials) == TRIALS
    assert len(builds) == len(rollouts) == TRIALS // 2
    assert all(t.interrupted for t in rollouts)
    assert sum(t.interrupted for t in builds) >= len(builds) // 2, [t.landed for t in builds]
    assert sum(t.changes_acked for t in rollouts) >= len(rollouts), "the server took changes before each kill"


def test_every_ready_version_verifies_against_its_manifest_after_every_kill(report):
    assert [(t.trial, t.version_violations) for t in report.trials if t.version_violations] == []
    assert all(t.ready >= 3 for t in report.trials)


def test_the_rollout_is_the_acknowledged_one_or_the_pending_change_after_every_kill(report):
    assert [(t.trial, t.rollout_violations) for t in report.trials if t.rollout_violations] == []
    steps = {"old": 0, "new": 1}  # generations past the last acknowledged one
    assert [(t.trial, t.outcome, t.registry_generation - t.acked_generation) for t in report.trials
            if steps.get(t.outcome) != t.registry_generation - t.acked_generation] == []


def test_a_restarted_server_serves_the_registry_rollout_at_once(report):
    assert [(t.trial, t.serving_violations) for t in report.trials if t.serving_violations] == []
    rollouts = _by_phase(report, "rollout")
    assert all(t.restart_s is not None and t.served for t in rollouts)


def test_versions_left_building_by_a_killed_build_never_become_ready(report):
    assert report.stale_building_final, "no build trial left a BUILDING version to watch"
    assert "READY" not in report.stale_building_final.values()
