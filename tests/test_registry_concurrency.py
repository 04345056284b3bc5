"""Several writers on one registry file: threads, two Registry objects, two processes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from colgrid_registry import GenerationConflict, Registry, open_registry

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
