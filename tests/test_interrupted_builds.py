"""A build killed mid-way (kill -9) is marked FAILED ("interrupted") and its files removed by
`colgrid index gc` and by a server starting on the data dir; a running build is left alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from colgrid_registry import VersionState, open_registry
from colgrid_server.interrupted import builder_identity, collect_interrupted
from colgrid_server.paths import DataDir
from tests.conftest import link_encoders, start_live_server, stop_live_server
from tests.test_cli import colgrid


def _killed_build(tmp_path: Path, shared_data_dir: Path, stdlib_documents) -> tuple[DataDir, str]:
    """Start `colgrid index build`, kill -9 it while its version is BUILDING."""
    data = DataDir(tmp_path / "data")
    link_encoders(data.root, shared_data_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in stdlib_documents[:1500]))
    proc = subprocess.Popen([sys.executable, "-m", "colgrid_server.cli", "index", "build", "docs", "--input",
                             str(corpus), "--data-dir", str(data.root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    version = None
    while version is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if data.registry_file.exists():
            with open_registry(data.registry_file) as registry:
                building = [v for v in registry.list_versions("docs") if v.state is VersionState.BUILDING] \
                    if any(i.name == "docs" for i in registry.list_indexes()) else []
            version = building[0].version if building else None
    assert version is not None, "the build never showed up as BUILDING"
    time.sleep(1.0)  # let it write some files
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return data, version


def test_gc_marks_a_killed_build_failed_and_removes_its_files(tmp_path, shared_data_dir, encoder_dir,
                                                              stdlib_documents) -> None:
    data, version = _killed_build(tmp_path, shared_data_dir, stdlib_documents)
    out = colgrid("index", "gc", "--data-dir", str(data.root)).stdout
    assert f"docs/{version}: FAILED" in out
    with open_registry(data.registry_file) as registry:
        record = registry.get_version("docs", version)
    assert record.state is VersionState.FAILED and record.error.startswith("interrupted")
    assert not [p for p in data.index_dir("docs").iterdir() if p.name.startswith(f".{version}.")]
    assert "no interrupted builds" in colgrid("index", "gc", "--data-dir", str(data.root)).stdout


def test_a_server_starting_on_the_data_dir_collects_killed_builds(tmp_path, shared_data_dir, encoder_dir,
                                                                  stdlib_documents) -> None:
    data, version = _killed_build(tmp_path, shared_data_dir, stdlib_documents)
    server, thread = start_live_server(data.root)
    stop_live_server(server, thread)
    with open_registry(data.registry_file) as registry:
        assert registry.get_version("docs", version).state is VersionState.FAILED


def test_a_build_whose_process_is_alive_is_left_alone(tmp_path) -> None:
    data = DataDir(tmp_path)
    with open_registry(data.registry_file) as registry:
        registry.ensure_index("docs")
        record = registry.allocate_version("docs", encoder_id="e", encoder_kind="colbert", dim=8, storage_uri="",
                                           build_params={"builder": builder_identity()})  # this very process
        foreign = registry.allocate_version("docs", encoder_id="e", encoder_kind="colbert", dim=8, storage_uri="",
                                            build_params={"builder": {"host": "elsewhere", "pid": 1,
                                                                      "started": time.time() - 7200}})
        assert collect_interrupted(data, registry) == []
        assert registry.get_version("docs", record.version).state is VersionState.BUILDING
        collected = collect_interrupted(data, registry, foreign_older_than_s=3600)
        assert [c.version for c in collected] == [foreign.version]
