"""`colgrid rollout ...` against a live server: every change prints the state after it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colgrid_server.cli import main
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    INDEX, rollout_documents, serving, three_versions, tiny_checkpoint, tiny_encoder_dir, version_template)

VERBS = ["start", "percent", "shadow", "promote", "rollback", "abort", "stable", "status", "history"]


def colgrid(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def pointers(out: str) -> dict[str, str]:
    """The `key: value` block a rollout view starts with."""
    block = out.split("\n\n", 1)[0]
    return dict((key, value.strip()) for key, _, value in (line.partition(":") for line in block.splitlines()))


@pytest.mark.parametrize("verb", VERBS)
def test_every_rollout_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main(["rollout", verb, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: colgrid rollout {verb}")


def test_rollout_verbs_change_the_rollout_and_print_the_state_after(three_versions, capsys, monkeypatch):
    monkeypatch.setenv("USER", "dana")
    with serving(three_versions) as s:
        target = ("--target", s.target)
        code, out, _ = colgrid(capsys, "rollout", "start", INDEX, "v2", "--percent", "20", "--reason", "try v2",
                               *target)
        assert code == 0
        assert pointers(out) | {"updated_at": ""} == {
            "index": INDEX, "generation": "2", "stable": "v1", "canary": "v2 (20%)", "shadow": "-",
            "previous_stable": "-", "updated_at": ""}
        assert "replicas: 1 of 1 live serving generation 2" in out
        assert "loaded: v1 (stable, 0 in flight); v2 (canary, 0 in flight)" in out

        steps = [
            (("percent", INDEX, "50"), {"canary": "v2 (50%)"}),
            (("shadow", INDEX, "v3", "--percent", "10"), {"shadow": "v3 (10%)"}),
            (("shadow", INDEX, "--clear"), {"shadow": "-"}),
            (("promote", INDEX, "--actor", "erin"), {"stable": "v2", "canary": "-", "previous_stable": "v1"}),
            (("rollback", INDEX), {"stable": "v1", "previous_stable": "v2"}),
            (("start", INDEX, "v3", "--percent", "5"), {"canary": "v3 (5%)"}),
            (("abort", INDEX), {"canary": "-"}),
            (("stable", INDEX, "v3"), {"stable": "v3", "previous_stable": "v1"}),
        ]
        for generation, (args, expected) in enumerate(steps, start=3):
            code, out, err = colgrid(capsys, "rollout", *args, *target)
            assert code == 0, err
            shown = pointers(out)
            assert shown["generation"] == str(generation)
            assert {key: shown[key] for key in expected} == expected, args

        code, out, _ = colgrid(capsys, "rollout", "status", INDEX, *target)
        assert code == 0 and pointers(out)["stable"] == "v3" and "serving generation 10" in out

        code, out, _ = colgrid(capsys, "rollout", "history", INDEX, "--limit", "20", *target)
    rows = out.splitlines()
    assert rows[0].split()[:4] == ["GEN", "AT", "ACTION", "ACTOR"]
    assert [row.split()[3] for row in rows[1:]] == [
        "set_stable", "abort_canary", "start_canary", "rollback", "promote", "clear_shadow", "set_shadow",
        "set_canary_percent", "start_canary", "set_stable"]
    assert "erin" in rows[5] and "dana" in rows[9] and "try v2" in rows[9]


def test_a_refused_change_exits_1_with_the_status_and_reason(three_versions, capsys):
    with serving(three_versions) as s:
        target = ("--target", s.target)
        code, _, err = colgrid(capsys, "rollout", "promote", INDEX, *target)
        assert code == 1 and "FAILED_PRECONDITION" in err and "no canary" in err
        code, _, err = colgrid(capsys, "rollout", "start", INDEX, "v9", "--percent", "5", *target)
        assert code == 1 and "NOT_FOUND" in err and "v9" in err
        code, _, err = colgrid(capsys, "rollout", "start", INDEX, "v2", "--percent", "5",
                               "--expected-generation", "0", *target)
        assert code == 1 and "ABORTED" in err
        code, _, err = colgrid(capsys, "rollout", "shadow", INDEX, *target)
        assert code == 1 and "VERSION" in err


def test_a_wait_that_runs_out_exits_2_naming_the_pending_replicas(three_versions, capsys):
    with serving(three_versions) as s:
        s.registry.heartbeat("stuck-replica", address="10.0.0.9:50051", served={INDEX: 1})
        code, out, _ = colgrid(capsys, "rollout", "start", INDEX, "v2", "--percent", "10", "--wait", "0.3",
                               "--target", s.target)
    assert code == 2
    assert pointers(out)["canary"] == "v2 (10%)"
    assert "1 of 2 live not serving generation 2 yet: stuck-replica" in out


def test_the_installed_command_runs_a_rollout_verb(three_versions):
    with serving(three_versions) as s:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "colgrid_server.cli", "rollout", "status", INDEX,
                               "--target", s.target], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert pointers(proc.stdout)["stable"] == "v1"
