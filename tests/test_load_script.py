"""scripts/load_test.py, briefly: a few streaming clients against a server it starts on a tiny
index finish with no failed request and write the figures as well-formed JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_rollout_support import tiny_checkpoint, tiny_encoder_dir  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


def test_a_short_load_run_fails_no_request_and_reports_latency_qps_and_server_memory(
        tmp_path: Path, tiny_encoder_dir: Path):  # noqa: F811
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--clients", "4", "--seconds", "3",
         "--warmup", "0.5", "--docs", "200", "--encoder", str(tiny_encoder_dir), "--work-dir", str(tmp_path / "work"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = json.loads(out.read_text())
    results = report["results"]
    assert report["config"]["clients"] == 4
    assert results["errors"] == 0, results["error_samples"]
    assert results["bad_requests_not_refused_as_expected"] == 0, results["bad_request_samples"]
    assert results["queries"] > 0 and results["qps"] > 0
    latency = results["latency_ms"]
    assert latency["count"] == results["queries"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert set(results["versions_served"]) == {"v1"}
    rss = results["server_rss_mb"]
    assert all(rss[key] > 0 for key in ("ready", "start", "end", "max"))
