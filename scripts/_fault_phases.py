"""One fault trial per phase: start the work, SIGKILL the process doing it after a random delay,
reopen the registry (restart the server where it was the one killed) and check the invariants.

- build:   `colgrid index build` child process, killed at a point aimed from the lab's timing
           (before its BUILDING row, anywhere in the build, near the publish/READY/stable end).
- rollout: the server child process, killed while a client streams rollout changes to it (each a
           compare-and-set on the generation it last acknowledged); then restarted.
- ingest:  the server child process, killed while a client streams documents to the Ingest RPC;
           then restarted. Runs only where the server implements Ingest (see `ingest_available`).
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from colgrid_registry import VersionState, open_registry
from scripts._fault_checks import (
    PendingChange, VersionFacts, check_rollout, check_serving, check_versions, expectation)
from scripts._fault_lab import INDEX, QUERIES, BuildTiming, Lab
from scripts._server import kill_now

ACTOR = "fault-trials"
ROLLOUT_KILL_S = (0.05, 1.5)   # kill the server this long after the first change is sent
CATCH_UP_S = 15.0              # a live server follows a registry change within this (poll 0.2 s)


@dataclass
class TrialResult:
    trial: int
    phase: str
    seed: int
    kill_plan: str = ""                 # where the kill was aimed
    kill_delay_s: float = 0.0
    interrupted: bool = False           # the process was still running when SIGKILL went out
    landed: str = ""                    # where the kill landed, read from what it left behind
    outcome: str = ""                   # rollout after the kill: "old" | "new" | "neither"
    acked_generation: int = 0
    registry_generation: int = 0
    pending: str | None = None          # the change in flight at the kill, if any
    changes_acked: int = 0
    stable: str | None = None
    served: list[str] = field(default_factory=list)  # versions that answered after the kill
    restart_s: float | None = None
    ready: int = 0
    building: list[str] = field(default_factory=list)
    published_not_ready: list[str] = field(default_factory=list)
    tmp_dirs: int = 0
    version_violations: list[str] = field(default_factory=list)
    rollout_violations: list[str] = field(default_factory=list)
    serving_violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def violations(self) -> list[str]:
        return self.version_violations + self.rollout_violations + self.serving_violations

    def record(self, facts: VersionFacts) -> None:
        self.ready = len(facts.ready)
        self.building = list(facts.building)
        self.published_not_ready = list(facts.published_not_ready)
        self.tmp_dirs = len(facts.tmp_dirs)


def pointers(rollout: Any) -> dict[str, Any]:
    """A client or registry Rollout as the audit log records it."""
    return {k: getattr(rollout, k) for k in ("stable", "canary", "canary_percent", "shadow", "shadow_percent",
                                             "previous_stable", "generation")}


def _verify(lab: Lab, result: TrialResult, acked: dict[str, Any], pending: PendingChange | None,
            built: set[str] | None = None) -> Any:
    """Reopen the registry as a restarted process would, and check versions and rollout.
    `built`: the versions a killed build created (its activation may only make one of them stable)."""
    with open_registry(lab.registry_file) as registry:
        problems, facts = check_versions(registry, INDEX, lab.index_dir, once_building=lab.once_building)
        result.version_violations += problems
        result.record(facts)
        problems, result.outcome, rollout = check_rollout(registry, INDEX, acked, pending)
        result.rollout_violations += problems
        if built is not None and result.outcome == "new" and rollout.stable not in built:
            result.rollout_violations.append(f"the build's activation made {rollout.stable} stable, "
                                             f"not a version it built ({sorted(built)})")
    result.acked_generation = int(acked["generation"])
    result.registry_generation = rollout.generation
    result.stable = rollout.stable
    return rollout


def _serve_check(lab: Lab, result: TrialResult, rollout: Any, *, catch_up_s: float) -> None:
    problems, result.served = check_serving(lab.live_server().target, INDEX, rollout, QUERIES[:3],
                                            catch_up_s=catch_up_s)
    result.serving_violations += problems


# ------------------------------------------------------------------------------------- build

KILL_PLANS = {  # where a build's (or an ingest's) kill is aimed, and how often
    "before-allocation": 10,  # imports, encoder load, receiving: no registry row yet
    "anywhere": 35,           # uniformly over allocation .. end (as the lab timed it)
    "end": 20,                # the last quarter: centroids, manifest, publish, READY, stable
    "at-publish": 15,         # as soon as the version directory appears (renamed into place)
    "at-ready": 10,           # as soon as the registry row is READY (before stable moves)
    "late": 10,               # around or after the end
}


def _aim(lab: Lab, proc: Any, before: set[str], timing: BuildTiming, started: float, rng: random.Random) -> str:
    """Wait until the moment a randomly drawn plan aims at (the kill follows at once), and
    teach `timing` what this build showed of the machine's current speed."""
    plan = rng.choices(list(KILL_PLANS), weights=list(KILL_PLANS.values()))[0]
    if plan == "before-allocation":
        time.sleep(rng.uniform(0.3, 0.95) * timing.to_allocated_s)
        return plan
    allocated = lab.wait_allocated(proc, before)
    if allocated is None:
        return plan
    timing.observe(to_allocated=allocated - started)
    (version,) = set(lab.versions()) - before
    if plan == "at-publish":
        condition = lambda: (lab.index_dir / version).exists()  # noqa: E731
    elif plan == "at-ready":
        condition = lambda: lab.versions()[version] is not VersionState.BUILDING  # noqa: E731
    else:
        low, high = {"anywhere": (0.0, 1.0), "end": (0.75, 1.05), "late": (1.0, 1.3)}[plan]
        moment = allocated + rng.uniform(low, high) * timing.allocated_to_end_s
        condition = lambda: time.monotonic() >= moment  # noqa: E731
    _poll(proc, condition)
    if plan in ("at-publish", "at-ready") or proc.poll() is not None:  # saw the end, or close to it
        timing.observe(allocated_to_end=time.monotonic() - allocated)
    return plan


def _poll(proc: Any, condition: Any, timeout_s: float = 120.0) -> None:
    """Return as soon as condition() holds or the process ended."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and not condition() and time.monotonic() < deadline:
        time.sleep(0.0005)


def _after_build_kill(lab: Lab, result: TrialResult, before: dict[str, VersionState], acked: dict[str, Any],
                      activate: bool) -> Any:
    """Checks shared by build and ingest trials; the rollout the registry is on."""
    after = lab.versions()
    new = set(after) - set(before)
    pending = PendingChange("set_stable", {"version": None}, expectation("set_stable", {"version": None})) \
        if activate else None
    rollout = _verify(lab, result, acked, pending, new)
    result.landed = _landed(lab, result, new, after, activate, rollout)
    lab.once_building |= {v for v in new if after[v] is VersionState.BUILDING}
    return rollout


def _landed(lab: Lab, result: TrialResult, new: set[str], after: dict[str, VersionState], activate: bool,
            rollout: Any) -> str:
    """Where the kill landed, read from what it left behind."""
    if not result.interrupted:
        return "exited before the kill"
    if not new:
        return "before allocation (no registry row)"
    if len(new) > 1:
        return f"{len(new)} new versions"
    (version,) = new
    state = after[version]
    if state is VersionState.BUILDING:
        if version in result.published_not_ready:
            return "published, not marked READY"
        writing = any(lab.index_dir.glob(f".{version}.tmp-*"))
        return "building (temporary directory)" if writing else "building (nothing written yet)"
    if state is VersionState.READY:
        if activate and rollout.stable != version:
            return "READY, not yet stable"
        return "complete (READY" + (", stable)" if activate else ")")
    return state.value


# ------------------------------------------------------------------------------------- build

def build_trial(lab: Lab, result: TrialResult, rng: random.Random) -> None:
    """Kill `colgrid index build`; the running server must keep serving the registry's stable."""
    lab.live_server()
    before = lab.versions()
    acked = pointers(lab.registry.get_rollout(INDEX))
    activate = rng.random() < 0.5
    proc = lab.spawn_build(activate=activate, log=lab.logs / f"build-{result.trial}.log")
    spawned = time.monotonic()
    try:
        plan = _aim(lab, proc, set(before), lab.timing, spawned, rng)
    finally:
        result.kill_delay_s = time.monotonic() - spawned
        result.interrupted = kill_now(proc)
    result.kill_plan = f"{plan} ({'activate' if activate else 'no-activate'})"
    if not result.interrupted:
        result.notes.append(f"the build had exited (status {proc.returncode}) before the kill")
    rollout = _after_build_kill(lab, result, before, acked, activate)
    if not lab.server.alive():  # only the build was killed: the server must have lived through it
        result.serving_violations.append(f"the server exited (status {lab.server.proc.returncode}) during a "
                                         f"build trial: {lab.server.log_tail(5)}")
    _serve_check(lab, result, rollout, catch_up_s=CATCH_UP_S)


# ----------------------------------------------------------------------------------- rollout

def _next_change(rng: random.Random, r: dict[str, Any], ready: list[str]) -> tuple[str, dict[str, Any]]:
    """A change the rollout rules accept from rollout `r` (same mix as the rollout stress test)."""
    others = [v for v in ready if v != r["stable"]]
    if rng.random() < 0.15:
        if r["shadow"] is None or rng.random() < 0.5:
            return "set_shadow", {"version": rng.choice(others), "percent": rng.randint(1, 100)}
        return "clear_shadow", {}
    if r["canary"] is None:
        roll = rng.random()
        if r["previous_stable"] in ready and roll < 0.2:
            return "rollback", {}
        if roll < 0.35:
            return "set_stable", {"version": rng.choice(others)}
        return "start_canary", {"version": rng.choice(others), "percent": rng.randint(1, 99)}
    action = rng.choice(["promote", "abort_canary", "set_canary_percent", "rollback"])
    if action == "rollback" and r["previous_stable"] not in ready:
        action = "abort_canary"
    if action == "set_canary_percent":
        return action, {"percent": rng.randint(0, 100)}
    return action, {}


def rollout_trial(lab: Lab, result: TrialResult, rng: random.Random) -> None:
    """SIGKILL the server mid-stream of rollout changes, restart it, check."""
    from colgrid_client import Client, ColgridError

    server = lab.live_server()
    ready = lab.ready_versions()
    delay = rng.uniform(*ROLLOUT_KILL_S)
    # "after-commit": once the delay has passed, kill the moment the registry holds a generation
    # the client has not had acknowledged yet (committed, not answered): the window for "new".
    plan = rng.choices(["random", "after-commit"], weights=[60, 40])[0]
    result.kill_plan = f"{plan}, during a stream of rollout changes"
    kill_sent = threading.Event()
    outcome: dict[str, bool] = {}
    acked_generation = [0]
    began = time.monotonic()

    def killer() -> None:
        time.sleep(delay)
        if plan == "after-commit":
            _poll(server.proc, lambda: lab.registry.get_rollout(INDEX).generation > acked_generation[0], 10.0)
        kill_sent.set()
        result.kill_delay_s = time.monotonic() - began
        outcome["interrupted"] = server.kill()

    pending: PendingChange | None = None
    with Client(server.target, timeout=30, retries=0) as client:
        acked = pointers(client.get_rollout(INDEX).rollout)
        acked_generation[0] = acked["generation"]
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        while True:
            action, arguments = _next_change(rng, acked, ready)
            pending = PendingChange(action, arguments, expectation(action, arguments))
            try:
                status = getattr(client, action)(INDEX, **arguments, expected_generation=acked["generation"],
                                                 actor=ACTOR, reason=f"trial {result.trial}")
            except ColgridError as exc:
                if kill_sent.is_set():
                    break
                result.notes.append(f"{action}{arguments} refused: {type(exc).__name__}: {exc}")
                pending = None  # refused: it changed nothing
                try:
                    acked = pointers(client.get_rollout(INDEX).rollout)
                except ColgridError:
                    if kill_sent.is_set():
                        break
                    raise
                acked_generation[0] = acked["generation"]
                continue
            acked, pending = pointers(status.rollout), None
            acked_generation[0] = acked["generation"]
            result.changes_acked += 1
            if kill_sent.is_set():
                break
    thread.join(60)
    result.interrupted = outcome.get("interrupted", False)
    result.pending = None if pending is None else f"{pending.action} {dict(pending.arguments)}"
    rollout = _verify(lab, result, acked, pending)
    result.landed = "between changes" if pending is None else f"during {pending.action}"
    started = time.monotonic()
    lab.start_server()
    result.restart_s = round(time.monotonic() - started, 3)
    _serve_check(lab, result, rollout, catch_up_s=0.0)
    _check_stale_building(lab, result)


def _check_stale_building(lab: Lab, result: TrialResult) -> None:
    """What a restarted server did to versions left BUILDING by killed builders (nothing, so
    far: they stay BUILDING); a change is noted, READY is a violation (checked in _verify)."""
    states = lab.versions()
    changed = {v: states[v].value for v in lab.once_building if states.get(v) is not VersionState.BUILDING}
    if changed:
        result.notes.append(f"after the restart, stale BUILDING versions are now {changed}")


# ------------------------------------------------------------------------------------ ingest

def ingest_available(target: str) -> bool:
    """Whether the SDK has `Client.ingest` and the server at `target` implements the Ingest
    RPC (an empty stream is refused; UNIMPLEMENTED means absent)."""
    import grpc

    from colgrid_client import Client
    from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc

    if not hasattr(Client, "ingest"):
        return False
    with grpc.insecure_channel(target) as channel:
        try:
            for _ in pb_grpc.IngestServiceStub(channel).Ingest(iter(()), timeout=10):
                pass
        except grpc.RpcError as exc:
            return exc.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


def ingest_trial(lab: Lab, result: TrialResult, rng: random.Random) -> None:
    """SIGKILL the server while it ingests the corpus streamed by a client, restart it, check."""
    server = lab.live_server()
    before = lab.versions()
    acked = pointers(lab.registry.get_rollout(INDEX))
    activate = rng.random() < 0.5
    stages: list[str] = []
    thread = threading.Thread(target=lab.ingest, args=(server.target, activate, stages.append), daemon=True)
    began = time.monotonic()
    thread.start()
    try:
        plan = _aim(lab, server.proc, set(before), lab.ingest_timing, began, rng)
    finally:
        result.kill_delay_s = time.monotonic() - began
        result.interrupted = server.kill()
    thread.join(60)
    result.kill_plan = f"{plan} ({'activate' if activate else 'no-activate'})"
    if stages:
        result.notes.append(f"last ingest stage seen: {stages[-1]}")
    rollout = _after_build_kill(lab, result, before, acked, activate)
    started = time.monotonic()
    lab.start_server()
    result.restart_s = round(time.monotonic() - started, 3)
    _serve_check(lab, result, rollout, catch_up_s=0.0)
    _check_stale_building(lab, result)


PHASES = {"build": build_trial, "rollout": rollout_trial, "ingest": ingest_trial}
