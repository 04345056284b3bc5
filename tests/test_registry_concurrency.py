"""Several writers on one registry file: threads, two Registry objects, two processes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from colgrid_registry import GenerationConflict, InvalidTransition, Registry, Rollout, open_registry
from colgrid_registry import _rollouts

SHA = "cd" * 32
ENCODER = {"encoder_id": "enc-123", "encoder_kind": "colbert", "dim": 384, "storage_uri": "/x",
           "build_params": {}}


def allocate_many(reg: Registry, count: int) -> list[str]:
    return [reg.allocate_version("docs", **ENCODER).version for _ in range(count)]


def test_threads_sharing_one_registry_allocate_distinct_versions(tmp_path: Path) -> None:
    with open_registry(tmp_path / "registry.db") as reg:
        reg.create_index("docs")
        with ThreadPoolExecutor(4) as pool:
            names = [n for batch in pool.map(lambda _: allocate_many(reg, 10), range(4)) for n in batch]
        assert sorted(names) == sorted(f"v{i}" for i in range(1, 41))
        assert len(reg.list_versions("docs")) == 40


def test_two_registry_objects_on_one_file_allocate_distinct_versions(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with open_registry(path) as first, open_registry(path) as second:
        first.create_index("docs")
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda reg: allocate_many(reg, 20), [first, second])
        assert sorted(a + b, key=lambda n: int(n[1:])) == [f"v{i}" for i in range(1, 41)]
        assert second.list_versions("docs") == first.list_versions("docs")


def test_two_processes_allocate_distinct_versions(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with open_registry(path) as reg:
        reg.create_index("docs")
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, time
        from colgrid_registry import open_registry
        with open_registry({str(path)!r}) as reg:
            while not pathlib.Path({str(go)!r}).exists():  # start writing together
                time.sleep(0.005)
            for _ in range(25):
                print(reg.allocate_version("docs", **{ENCODER!r}).version)
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    go.touch()
    outputs = [w.communicate(timeout=60)[0].split() for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    assert sorted(outputs[0] + outputs[1], key=lambda n: int(n[1:])) == [f"v{i}" for i in range(1, 51)]


def test_racing_compare_and_set_lets_exactly_one_writer_win(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with open_registry(path) as first, open_registry(path) as second:
        first.create_index("docs")
        versions = allocate_many(first, 2)
        for version in versions:
            first.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)

        def attempt(args: tuple[Registry, str]) -> str:
            reg, version = args
            try:
                reg.set_stable("docs", version, expected_generation=0)
                return version
            except GenerationConflict:
                return "conflict"

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(attempt, zip([first, second], versions)))
        winners = [r for r in results if r != "conflict"]
        assert len(winners) == 1 and results.count("conflict") == 1
        rollout = second.get_rollout("docs")
        assert (rollout.stable, rollout.generation) == (winners[0], 1)
        assert len(first.audit_log("docs")) == 1


# -- rollout operations racing -------------------------------------------------------------------------

def ready_registry_pair(path: Path, versions: int) -> tuple[Registry, Registry]:
    """Two Registry objects on one file; "docs" has READY v1..v<versions> and v1 stable."""
    first, second = open_registry(path), open_registry(path)
    first.create_index("docs")
    for version in allocate_many(first, versions):
        first.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=SHA)
    first.set_stable("docs", "v1")
    return first, second


def test_racing_percent_changes_on_one_generation_let_exactly_one_win(tmp_path: Path) -> None:
    first, second = ready_registry_pair(tmp_path / "registry.db", 2)
    with first, second:
        generation = first.start_canary("docs", "v2", 1).generation

        def attempt(percent: int) -> int | None:
            reg = (first, second)[percent % 2]
            try:
                return reg.set_canary_percent("docs", percent, expected_generation=generation).canary_percent
            except GenerationConflict:
                return None

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(10, 90, 10)))
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        rollout = second.get_rollout("docs")
        assert (rollout.canary_percent, rollout.generation) == (winners[0], generation + 1)
        assert [e.action for e in first.audit_log("docs")].count("set_canary_percent") == 1


def test_racing_canary_starts_without_expected_generation_let_exactly_one_win(tmp_path: Path) -> None:
    first, second = ready_registry_pair(tmp_path / "registry.db", 3)
    with first, second:
        def attempt(args: tuple[Registry, str]) -> str:
            reg, version = args
            try:
                return reg.start_canary("docs", version, 10).canary
            except InvalidTransition as exc:
                assert "abort or promote the running canary first" in str(exc)
                return "refused"

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(attempt, [(first, "v2"), (second, "v3")]))
        winners = [r for r in results if r != "refused"]
        assert len(winners) == 1 and second.get_rollout("docs").canary == winners[0]
        assert [e.action for e in first.audit_log("docs")] == ["start_canary", "set_stable"]


def test_many_racing_writers_produce_one_unbroken_chain_of_generations(tmp_path: Path) -> None:
    """Four writers on two Registry objects each read the rollout and try the next step of a
    canary cycle at that generation. Every success is exactly one generation and one audit
    entry, and each audit entry starts where the previous one ended."""
    first, second = ready_registry_pair(tmp_path / "registry.db", 3)
    with first, second:
        def writer(worker: int) -> int:
            reg, wins = (first, second)[worker % 2], 0
            for _ in range(15):
                try:
                    next_step(reg, reg.get_rollout("docs"), promote=worker % 2 == 1)
                    wins += 1
                except (GenerationConflict, InvalidTransition):
                    pass
            return wins

        with ThreadPoolExecutor(4) as pool:
            wins = sum(pool.map(writer, range(4)))
        entries = list(reversed(first.audit_log("docs", limit=1000)))
        assert wins >= 1
        assert second.get_rollout("docs").generation == 1 + wins == len(entries)
        assert [e.after["generation"] for e in entries] == list(range(1, wins + 2))
        assert all(e.before == prior.after for prior, e in zip(entries, entries[1:]))


def next_step(reg: Registry, seen: Rollout, *, promote: bool) -> Rollout:
    """The next step of a canary cycle from the rollout `seen`, compare-and-set on its generation."""
    cas = {"expected_generation": seen.generation}
    if seen.canary is None:
        return reg.start_canary("docs", "v3" if seen.stable != "v3" else "v2", 10, **cas)
    return reg.promote("docs", **cas) if promote else reg.abort_canary("docs", **cas)


def test_the_rollout_write_itself_is_a_compare_and_set(tmp_path: Path) -> None:
    """Even a writer holding a stale read (possible on a database whose reads take no write
    lock) cannot overwrite a newer generation: the UPDATE matches on the generation it read."""
    first, second = ready_registry_pair(tmp_path / "registry.db", 2)
    with first, second:
        stale = first.get_rollout("docs")
        second.start_canary("docs", "v2", 10)
        with pytest.raises(GenerationConflict) as caught:
            with first._db.transaction(write=True) as conn:
                _rollouts.write_rollout(conn, stale, {"stable": "v2"}, action="set_stable", actor="x",
                                        reason="")
        assert (caught.value.expected, caught.value.actual) == (1, 2)
        assert second.get_rollout("docs").stable == "v1"
        assert len(second.audit_log("docs")) == 2
