"""`colgrid ingest`: files streamed to a real server on loopback, refusals printed, version built."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from colgrid_client import Client
from colgrid_server.cli import main
from tests.conftest import LiveServer, link_encoders, start_live_server, stop_live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data_dir, encoder_dir) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("cli-ingest")
    link_encoders(data, shared_data_dir)
    live, thread = start_live_server(data)
    yield live
    stop_live_server(live, thread)


@pytest.fixture()
def extra_dir(tmp_path: Path) -> Path:
    (tmp_path / "more.jsonl").write_text(
        json.dumps({"id": "j1", "text": "sourdough starter feeding schedule", "metadata": {"tag": "bread"}}) + "\n"
        + "not json\n")
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / ".hidden.txt").write_text("never sent")
    return tmp_path


def test_ingest_streams_files_and_folders_and_prints_what_was_skipped(
        server: LiveServer, mixed_sources_dir: Path, extra_dir: Path, capsys) -> None:
    code = main(["ingest", "cli-docs", str(mixed_sources_dir), str(extra_dir), "--target", server.target,
                 "--n-centroids", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # notes.txt, readme.md and one JSONL line; the bundled text encoder refuses images and PDFs.
    assert out.startswith("cli-docs/v1 READY: 3 documents") and "5 inputs skipped" in out
    assert "skipped chart.png: " in err and "[unsupported_by_encoder]" in err
    assert "skipped report.pdf: " in err
    assert "skipped table.csv: " in err and "skipped more.jsonl#L2: line 2" in err
    assert ".hidden" not in err
    with Client(server.target, timeout=60, retries=0) as client:
        hit = client.search("cli-docs", "sourdough starter", k=1)[0]
        assert (hit.doc_id, hit.metadata["tag"], hit.metadata["source"]) == ("j1", "bread", "more.jsonl")
        assert {h.doc_id for h in client.search("cli-docs", "travel photo", k=3)} == {"notes.txt", "readme.md", "j1"}


def test_activate_makes_the_new_version_stable(server: LiveServer, mixed_sources_dir: Path, capsys) -> None:
    notes = str(mixed_sources_dir / "notes.txt")
    assert main(["ingest", "cli-cutover", notes, "--target", server.target, "--n-centroids", "4"]) == 0
    assert main(["ingest", "cli-cutover", notes, "--target", server.target, "--n-centroids", "4"]) == 0
    with Client(server.target, timeout=60, retries=0) as client:
        assert client.get_rollout("cli-cutover").rollout.stable == "v1"
    assert main(["ingest", "cli-cutover", notes, "--target", server.target, "--n-centroids", "4",
                 "--activate", "--codec", "int8"]) == 0
    with Client(server.target, timeout=60, retries=0) as client:
        assert client.get_rollout("cli-cutover").rollout.stable == "v3"
        assert client.get_version("cli-cutover", "v3").build_params["codec"] == "int8"
    capsys.readouterr()


def test_a_server_error_is_one_line_and_exit_status_1(server: LiveServer, mixed_sources_dir: Path, capsys) -> None:
    code = main(["ingest", "cli-missing-encoder", str(mixed_sources_dir / "notes.txt"), "--target", server.target,
                 "--encoder-id", "f" * 64])
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("colgrid: error: ") and "encoder" in err and "Traceback" not in err
