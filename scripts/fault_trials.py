"""Crash-safety trials: SIGKILL during index builds, rollouts and ingests, then check that nothing
incomplete became visible.

    .venv/bin/python scripts/fault_trials.py --trials 50 --out bench/results/faults.json

Every trial picks a phase (build, rollout, ingest: see scripts/_fault_phases.py), kills the
process doing the work with SIGKILL after a random delay, reopens the registry (restarting the
server where the server was killed) and checks:

- every READY version verifies (all files present, sha256 as in its manifest, manifest sha256 as
  the registry recorded it), so no READY version is incomplete;
- the rollout is on the generation the client last had acknowledged, or exactly one change
  later with that change's result, as one audit entry recording it (old or new, never between);
- a (re)started server serves the registry's rollout: its generation, no load errors, each
  answer from the version its role names;
- a version left BUILDING by a killed builder never becomes READY later.

Trials share one data dir, so each starts from what the kills before it left behind. Results
go to --out as JSON: the configuration, a summary and one record per trial. Exit status 1 if any
invariant failed. Importable: `run_trials(LabConfig(...), trials=..., phases=...)`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `scripts` is imported as a package from the repository root
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts._fault_lab import INDEX, Lab, LabConfig, open_lab  # noqa: E402
from scripts._fault_phases import PHASES, TrialResult, ingest_available  # noqa: E402

__all__ = ["FaultReport", "LabConfig", "TrialResult", "run_trials", "main"]


@dataclass
class FaultReport:
    config: dict
    trials: list[TrialResult] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # phase -> why it did not run
    setup: dict = field(default_factory=dict)
    stale_building_final: dict[str, str] = field(default_factory=dict)
    replicas_at_end: dict[str, int] = field(default_factory=dict)  # killed servers' rows stay behind
    elapsed_s: float = 0.0

    @property
    def violations(self) -> list[str]:
        return [f"trial {t.trial} ({t.phase}): {v}" for t in self.trials for v in t.violations]

    def summary(self) -> dict:
        restarts = [t.restart_s for t in self.trials if t.restart_s is not None]
        return {
            "trials": len(self.trials),
            "by_phase": dict(Counter(t.phase for t in self.trials)),
            "interrupted": sum(t.interrupted for t in self.trials),
            "violations": len(self.violations),
            "outcomes": {phase: dict(Counter(t.outcome for t in self.trials if t.phase == phase))
                         for phase in sorted({t.phase for t in self.trials})},
            "landed": {phase: dict(Counter(t.landed for t in self.trials if t.phase == phase))
                       for phase in sorted({t.phase for t in self.trials})},
            "changes_acked": sum(t.changes_acked for t in self.trials),
            "restart_s": {"count": len(restarts), "median": round(statistics.median(restarts), 3) if restarts else None,
                          "max": max(restarts, default=None)},
            # What restarts do to versions whose builder was killed: {version: state} at the end.
            "stale_building": {"versions": len(self.stale_building_final),
                               "states_at_end": dict(Counter(self.stale_building_final.values())),
                               "cleaned_or_failed_by_restart": any(s != "BUILDING"
                                                                   for s in self.stale_building_final.values())},
            "tmp_dirs_at_end": self.trials[-1].tmp_dirs if self.trials else 0,
            "published_not_ready_at_end": self.trials[-1].published_not_ready if self.trials else [],
            "replicas_at_end": self.replicas_at_end,
            "unavailable_phases": self.unavailable,
            "elapsed_s": round(self.elapsed_s, 1),
        }

    def to_json(self) -> dict:
        return {"config": self.config, "setup": self.setup, "summary": self.summary(),
                "violations": self.violations,
                "trials": [{**asdict(t), "violations": t.violations} for t in self.trials]}


def run_trials(config: LabConfig, *, trials: int, phases: Sequence[str] = ("build", "rollout", "ingest"),
               on_trial: Callable[[TrialResult], None] | None = None,
               stop: Callable[[], bool] = lambda: False) -> FaultReport:
    """Prepare a lab in config.work_dir and run `trials` kill trials, phases in a shuffled even
    mix. A phase the server does not offer (ingest, without the Ingest RPC) is left out and
    named in `report.unavailable`. `stop()` is asked between trials: True ends the run early
    (the report holds the trials done)."""
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; choose from {sorted(PHASES)}")
    began = time.monotonic()
    rng = random.Random(config.seed)
    report = FaultReport(config={"trials": trials, "phases": list(phases), "documents": config.documents,
                                 "seed": config.seed, "encoder": "given" if config.encoder_dir else "tiny-bert"})
    lab = open_lab(config)
    try:
        report.setup = {"build_to_allocated_s": round(lab.timing.to_allocated_s, 3),
                        "build_allocated_to_end_s": round(lab.timing.allocated_to_end_s, 3),
                        "server_start_s": round(lab.server.started_s, 3), "initial_versions": lab.ready_versions()}
        runnable = [p for p in phases if p != "ingest" or _offers_ingest(lab, report)]
        if "ingest" in runnable:
            timing = lab.time_ingest()
            report.setup.update(ingest_to_allocated_s=round(timing.to_allocated_s, 3),
                                ingest_allocated_to_end_s=round(timing.allocated_to_end_s, 3))
        if not runnable:
            raise ValueError(f"none of the phases {list(phases)} can run here: {report.unavailable}")
        schedule = [runnable[i % len(runnable)] for i in range(trials)]
        rng.shuffle(schedule)
        for number, phase in enumerate(schedule, start=1):
            if stop():
                break
            seed = rng.randrange(2**31)
            result = TrialResult(trial=number, phase=phase, seed=seed)
            started = time.monotonic()
            try:
                PHASES[phase](lab, result, random.Random(seed))
            except Exception as exc:  # noqa: BLE001 - a harness failure is reported as the trial's
                result.notes.append(f"trial aborted: {type(exc).__name__}: {exc}")
                result.serving_violations.append(f"trial could not complete: {type(exc).__name__}: {exc}")
            result.duration_s = round(time.monotonic() - started, 3)
            result.kill_delay_s = round(result.kill_delay_s, 3)
            report.trials.append(result)
            if on_trial is not None:
                on_trial(result)
        report.setup["build_timing_at_end"] = {"to_allocated_s": round(lab.timing.to_allocated_s, 3),
                                               "allocated_to_end_s": round(lab.timing.allocated_to_end_s, 3)}
        states = lab.versions()
        report.stale_building_final = {v: states[v].value for v in sorted(lab.once_building)}
        replicas = lab.registry.list_replicas()
        report.replicas_at_end = {"live": sum(r.live for r in replicas), "stale": sum(not r.live for r in replicas)}
    finally:
        lab.close()
        report.elapsed_s = time.monotonic() - began
    return report


def _offers_ingest(lab: Lab, report: FaultReport) -> bool:
    if ingest_available(lab.live_server().target):
        return True
    report.unavailable["ingest"] = ("no Client.ingest in the SDK, or the server answers IngestService.Ingest "
                                    "with UNIMPLEMENTED; the phase runs once both exist")
    return False


def _line(t: TrialResult) -> str:
    mark = "ok " if not t.violations else "BAD"
    return (f"{mark} #{t.trial:<3} {t.phase:<7} kill {t.kill_delay_s:6.3f}s  {t.landed:<38} "
            f"{t.outcome:<7} gen {t.acked_generation}->{t.registry_generation}  stable {t.stable}"
            + "".join(f"\n      ! {v}" for v in t.violations))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.json")
    parser.add_argument("--phases", default="build,rollout,ingest",
                        help="comma-separated, from build, rollout, ingest (default: all that the server offers)")
    parser.add_argument("--docs", type=int, default=300, help="documents in the corpus each build indexes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", type=Path, help="an exported encoder dir (default: export a tiny random BERT)")
    parser.add_argument("--work-dir", type=Path, help="keep the data dir and logs here (default: a temporary dir)")
    args = parser.parse_args(argv)

    stopping: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the trial under way, then write what we have
        signal.signal(sig, lambda number, _frame: stopping.append(number))
    with tempfile.TemporaryDirectory(prefix="colgrid-faults-") as tmp:
        config = LabConfig(work_dir=args.work_dir or Path(tmp), documents=args.docs, encoder_dir=args.encoder,
                           seed=args.seed)
        print(f"fault trials: {args.trials} on {INDEX!r}, phases {args.phases}, work dir {config.work_dir}", flush=True)
        report = run_trials(config, trials=args.trials, phases=[p for p in args.phases.split(",") if p],
                            on_trial=lambda t: print(_line(t), flush=True), stop=lambda: bool(stopping))
    document = report.to_json()
    document["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(json.dumps(document["summary"], indent=2, default=str))
    print(f"wrote {args.out}")
    return 1 if report.violations or stopping else 0


if __name__ == "__main__":
    raise SystemExit(main())
