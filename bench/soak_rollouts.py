"""Rollout soak: many alias changes while clients search continuously. Not part of CI.

    .venv/bin/python bench/soak_rollouts.py [--changes 1000] [--clients 8] [--streams 2] [--seed 0]

Builds, in a temporary data dir, four versions of one index from real docstrings with two tiny
real ONNX encoders (three on one, one on the other, so cutovers also switch encoders), starts a
real server on a free port (registry polled every 0.5 s), then makes --changes rollout changes
through the RolloutService (canary starts, percent changes, promotions, aborts, rollbacks,
shadow set/clear) while --clients threads search (--streams of them over SearchStream).

Every answer is checked as in tests/test_rollout_stress.py: no failed request; the answering
version was live (stable or canary) within the request's window and is the pointer its role
names in the generation it reports; the answer equals that version's own answer computed by
loading it alone; no stream mixes versions. Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the harness lives with the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=2, help="how many of the clients use SearchStream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()

    from colgrid_server.corpus import iter_docstring_documents
    from tests.conftest import start_live_server, stop_live_server
    from tests.test_rollout_stress import check, expected_answers, run_stress, stress_versions
    from tests.test_rollout_support import (DOCS_PER_VERSION, build_versions, export_tiny_encoder,
                                            make_tiny_checkpoint)

    with tempfile.TemporaryDirectory(prefix="colgrid-soak-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        checkpoint = make_tiny_checkpoint(work / "checkpoint")
        tiny = export_tiny_encoder(checkpoint, work / "encoders" / "tiny-bert")
        other = export_tiny_encoder(checkpoint, work / "encoders" / "tiny-bert-short", query_max_length=8)
        documents = list(iter_docstring_documents(limit=8 * DOCS_PER_VERSION))
        data_dir = work / "data"
        build_versions(data_dir, tiny, documents, 3)
        versions = stress_versions(data_dir, tiny, other, documents)
        expected = expected_answers(data_dir, versions)
        print(f"prepared {versions} in {time.monotonic() - started:.1f}s; soaking with {args.changes} changes, "
              f"{args.clients} clients ({args.streams} streaming)", flush=True)

        server, thread = start_live_server(data_dir, registry_poll_seconds=0.5)
        try:
            report = run_stress(server.target, versions, changes=args.changes, clients=args.clients,
                                streams=args.streams, seed=args.seed)
        finally:
            stop_live_server(server, thread)
        report.violations = check(report, expected)

    print(report.summary())
    for problem in (report.failures + report.violations)[:20]:
        print("  ", problem)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "changes": len(report.changes) - 1, "answers": len(report.observed), "failed": len(report.failures),
            "violations": len(report.violations), "elapsed_s": round(report.elapsed_s, 1),
            "summary": report.summary()}, indent=2))
    ok = not report.failures and not report.violations and len(report.changes) - 1 >= args.changes
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
