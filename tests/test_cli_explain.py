"""`colgrid explain`, run as a user would (subprocesses), against a real server serving a version
built from real pages and text files with the tiny ColQwen2."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colgrid_registry import open_registry
from colgrid_server.builder import build_index_from_sources
from colgrid_server.ingest import iter_sources
from colgrid_server.paths import DataDir
from tests.conftest import start_live_server, stop_live_server

QUERY = "profit margin by quarter"


@pytest.fixture(scope="module")
def server(tmp_path_factory, mixed_sources_dir):
    from colgrid_server.encoders import export_colqwen2
    from colgrid_server.encoders.tiny_models import build_tiny_colqwen2

    root = tmp_path_factory.mktemp("cli-explain")
    encoder = export_colqwen2(build_tiny_colqwen2(root / "ckpt", seed=0), root / "encoder", progress=False).path
    data_dir = root / "data"
    with open_registry(DataDir(data_dir).registry_file) as registry:
        build_index_from_sources(DataDir(data_dir), registry, "pages", iter_sources(mixed_sources_dir, pdf_dpi=36),
                                 encoder_dir=encoder, build_params={"n_centroids": 16}, progress=False)
    live, thread = start_live_server(data_dir)
    yield live
    stop_live_server(live, thread)


def colgrid(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("COLGRID_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "colgrid_server.cli", "explain", *args, "--target", server.target],
                          capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"colgrid explain {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _tokens(server) -> int:
    return len(json.loads(colgrid(server, "pages", "chart.png", QUERY, "--json").stdout)["matches"])


def test_help_names_the_arguments():
    proc = subprocess.run([sys.executable, "-m", "colgrid_server.cli", "explain", "--help"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert proc.stdout.startswith("usage: colgrid explain")
    assert "DOC_ID" in proc.stdout and "--token" in proc.stdout and "--out" in proc.stdout


def test_page_prints_a_row_per_query_token_with_its_patch_and_box(server):
    lines = colgrid(server, "pages", "chart.png", QUERY).stdout.splitlines()
    assert lines[0].startswith("pages@v1  chart.png  (image, 6x9 patches, 640x480 px)  score ")
    assert lines[0].endswith("map: all tokens summed")
    assert lines[1].split()[:4] == ["TOKEN", "QUERY", "TOKEN", "PATCH"]
    rows = lines[2:]
    assert len(rows) == _tokens(server)
    for i, row in enumerate(rows):
        assert row.split()[0] == str(i)
        assert row.endswith("%") and row.count("(") >= 2  # (row, col) and (x0, y0, x1, y1)


def test_out_writes_a_png_heatmap_of_the_page_size(server, tmp_path):
    out = tmp_path / "heat.png"
    proc = colgrid(server, "pages", "report.pdf#p1", QUERY, "--out", str(out))
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (306, 396)
    assert f"heatmap written to {out}" in proc.stderr


def test_token_marks_its_row_and_maps_only_that_token(server, tmp_path):
    one, every = tmp_path / "one.png", tmp_path / "all.png"
    proc = colgrid(server, "pages", "photo.jpg", QUERY, "--token", "1", "--out", str(one))
    colgrid(server, "pages", "photo.jpg", QUERY, "--out", str(every))
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("map: token 1")
    assert [row.split()[0] for row in lines[2:5]] == ["0", "1*", "2"]
    assert not np.array_equal(np.asarray(Image.open(one)), np.asarray(Image.open(every)))


def test_json_carries_the_patch_score_grid(server):
    payload = json.loads(colgrid(server, "pages", "report.pdf#p3", QUERY, "--json").stdout)
    rows, cols = payload["grid"]
    assert (rows, cols) == (7, 9)
    assert len(payload["patch_scores"]) == rows and all(len(r) == cols for r in payload["patch_scores"])
    assert "heatmap_png" not in payload


def test_text_document_shows_tokens_and_spans(server):
    lines = colgrid(server, "pages", "notes.txt", QUERY).stdout.splitlines()
    assert lines[0].startswith("pages@v1  notes.txt  (text)  score ")
    assert lines[1].split() == ["TOKEN", "QUERY", "TOKEN", "DOC", "TOKEN", "SPAN", "SIM", "SHARE"]
    assert any("[" in row and ":" in row for row in lines[2:])


def test_out_on_a_text_document_exits_1_and_writes_nothing(server, tmp_path):
    out = tmp_path / "text.png"
    proc = colgrid(server, "pages", "readme.md", QUERY, "--out", str(out), check=False)
    assert proc.returncode == 1
    assert "text document" in proc.stderr and not out.exists()


def test_unknown_document_exits_1_naming_it(server):
    proc = colgrid(server, "pages", "missing.png", QUERY, check=False)
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr and "'missing.png' is not in pages/v1" in proc.stderr


def test_token_out_of_range_exits_1_with_the_reason(server):
    proc = colgrid(server, "pages", "chart.png", QUERY, "--token", "5000", check=False)
    assert proc.returncode == 1
    assert "INVALID_ARGUMENT" in proc.stderr and "query_token 5000 is out of range" in proc.stderr
