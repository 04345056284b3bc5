"""The `colgrid` command line, run as a user would (subprocesses), against real servers and data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from colgrid_registry import VersionState, open_registry
from colgrid_server.paths import DataDir
from tests.conftest import link_encoders

VERBS = [[], ["serve"], ["demo"], ["encoder"], ["encoder", "export"], ["encoder", "info"], ["index"],
         ["index", "build"], ["index", "verify"], ["registry"], ["registry", "list"], ["registry", "show"],
         ["search"], ["encode"], ["index", "gc"], ["keys"], ["keys", "create"], ["explain"], ["eval"], ["ingest"]]


def colgrid(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("COLGRID_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "colgrid_server.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"colgrid {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v) or "colgrid")
def test_every_verb_has_help(verb):
    proc = colgrid(*verb, "--help")
    assert proc.stdout.startswith("usage: colgrid")


def test_search_prints_a_readable_table_with_explanations(live_server):
    proc = colgrid("search", "docs", "read lines from a file", "-k", "3", "--explain",
                   "--target", live_server.target)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("docs@v1  3 hits")
    assert lines[1].split() == ["rank", "score", "doc"]
    assert "→" in proc.stdout and "sim" in proc.stdout


def test_search_json_output_parses(live_server):
    proc = colgrid("search", "docs", "sort a list", "-k", "2", "--json", "--target", live_server.target)
    payload = json.loads(proc.stdout)
    assert payload["version"] == "v1" and len(payload["hits"]) == 2


def test_search_against_an_unknown_index_exits_1_with_the_reason(live_server):
    proc = colgrid("search", "nope", "x", "--target", live_server.target, check=False)
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr and "nope" in proc.stderr


def test_index_build_registers_a_ready_stable_version(tmp_path, shared_data_dir, encoder_dir, stdlib_documents):
    link_encoders(tmp_path, shared_data_dir)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": d.id, "text": d.text, "metadata": dict(d.metadata)}) + "\n"
                            for d in stdlib_documents[:25]))
    proc = colgrid("index", "build", "mini", "--input", str(docs), "--data-dir", str(tmp_path))
    assert "mini/v1 READY: 25 documents" in proc.stdout

    listing = colgrid("registry", "list", "--data-dir", str(tmp_path)).stdout
    assert listing.splitlines()[1].split()[:2] == ["mini", "v1"]
    show = colgrid("registry", "show", "mini", "--data-dir", str(tmp_path)).stdout
    assert "READY" in show and "stable" in show
    assert "mini/v1: ok" in colgrid("index", "verify", "mini", "--data-dir", str(tmp_path)).stdout


def test_a_bad_jsonl_line_is_skipped_and_named_while_the_rest_is_indexed(tmp_path, shared_data_dir, encoder_dir):
    link_encoders(tmp_path, shared_data_dir)
    docs = tmp_path / "bad.jsonl"
    docs.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "also fine"}\nnot json\n')
    proc = colgrid("index", "build", "partly", "--input", str(docs), "--data-dir", str(tmp_path))

    assert "bad.jsonl#L3" in proc.stderr and "JSON" in proc.stderr
    assert "2 documents" in proc.stdout and "1 inputs skipped" in proc.stdout
    with open_registry(DataDir(tmp_path).registry_file) as registry:
        (version,) = registry.list_versions("partly")
        assert version.state == VersionState.READY and version.documents == 2


def test_strict_build_fails_on_a_bad_jsonl_line_naming_it(tmp_path, shared_data_dir, encoder_dir):
    link_encoders(tmp_path, shared_data_dir)
    docs = tmp_path / "bad.jsonl"
    docs.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "also fine"}\nnot json\n')
    proc = colgrid("index", "build", "broken", "--input", str(docs), "--strict", "--data-dir", str(tmp_path),
                   check=False)

    assert proc.returncode == 1
    assert "bad.jsonl#L3" in proc.stderr and "JSON" in proc.stderr
    with open_registry(DataDir(tmp_path).registry_file) as registry:
        (version,) = registry.list_versions("broken")
        assert version.state == VersionState.FAILED
        assert registry.get_rollout("broken").stable is None
    assert not DataDir(tmp_path).version_dir("broken", version.version).exists()
    assert not any(p.name.startswith(".") for p in DataDir(tmp_path).index_dir("broken").iterdir())


def test_encoder_info_prints_the_spec_and_id(encoder_dir):
    info = json.loads(colgrid("encoder", "info", str(encoder_dir)).stdout)
    assert info["kind"] == "colbert" and info["dim"] == 384 and len(info["id"]) == 64


def test_invalid_index_name_is_a_clear_error(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": "a", "text": "fine"}\n')
    proc = colgrid("index", "build", "../escape", "--input", str(docs), "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 1 and "colgrid: error:" in proc.stderr
    assert not (tmp_path.parent / "escape").exists()


def test_encoder_export_handles_a_colqwen2_checkpoint(tmp_path):
    from colgrid_server.encoders.tiny_models import build_tiny_colqwen2

    checkpoint = tmp_path / "tiny-colqwen2"
    build_tiny_colqwen2(checkpoint, seed=0)
    out = tmp_path / "encoder"
    proc = colgrid("encoder", "export", str(checkpoint), "--kind", "colqwen2", "--out", str(out))
    import re

    figures = [float(x) for x in re.findall(r"min cosine ([0-9.]+)", proc.stdout)]
    assert len(figures) == 2 and min(figures) >= 0.999
    info = json.loads(colgrid("encoder", "info", str(out)).stdout)
    assert info["kind"] == "colqwen2" and info["image"] is not None


def test_multimodal_export_without_a_checkpoint_is_a_clear_error(tmp_path):
    proc = colgrid("encoder", "export", "--kind", "colpali", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 1 and "needs a local checkpoint" in proc.stderr


def test_index_build_with_a_codec_records_it_and_serves(tmp_path, shared_data_dir, encoder_dir, stdlib_documents):
    from colgrid_server.index import open_version

    link_encoders(tmp_path, shared_data_dir)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in stdlib_documents[:30]))
    colgrid("index", "build", "small", "--input", str(docs), "--codec", "int8", "--data-dir", str(tmp_path))

    show = colgrid("registry", "show", "small", "v1", "--data-dir", str(tmp_path)).stdout
    assert '"codec": "int8"' in show
    version = open_version(DataDir(tmp_path).version_dir("small", "v1"))
    try:
        assert version.codec == "int8" and version.documents == 30
    finally:
        version.close()
