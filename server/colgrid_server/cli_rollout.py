"""`colgrid rollout ...`: staged cutover of an index through a running server (the SDK's rollout
methods against --target). Every change prints the rollout after it, who serves it, and what
the answering server knows (shadow comparisons, load errors, loaded versions).

Views reuse the registry's formatters (`colgrid_registry.format`), so `colgrid rollout status`
and `colgrid registry show` print pointers, replicas and audit entries the same way.
"""
from __future__ import annotations

import argparse
import getpass
import os
from datetime import datetime, timezone
from typing import Any

from colgrid_server.cli_client import connect

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def add_rollout_verbs(verbs: argparse._SubParsersAction, client_opts) -> None:
    rollout = verbs.add_parser("rollout", help="canary, shadow, promote and roll back an index",
                               description="Staged rollouts of an index on a running server.")
    sub = rollout.add_subparsers(dest="rollout_verb", required=True, metavar="VERB")

    def change(p: argparse.ArgumentParser) -> None:
        client_opts(p)
        p.add_argument("--expected-generation", type=int,
                       help="refuse unless the rollout is still at this generation (compare-and-set)")
        p.add_argument("--reason", default="", help="why (kept in the audit log)")
        p.add_argument("--actor", default=_default_actor(), help="who (default $USER)")
        p.add_argument("--wait", type=float, metavar="SECONDS",
                       help="wait up to SECONDS until every live replica serves the change; exit "
                            "status 2 (change made, replicas pending) if some do not")

    p = sub.add_parser("start", help="start a canary", description="Send PERCENT% of traffic to VERSION.")
    p.add_argument("index")
    p.add_argument("version")
    p.add_argument("--percent", type=int, required=True, help="share of routing keys, 0..100")
    change(p)
    p.set_defaults(fn=cmd_rollout_start)

    p = sub.add_parser("percent", help="change the canary's share",
                       description="Set the running canary's share of traffic (0..100).")
    p.add_argument("index")
    p.add_argument("percent", type=int)
    change(p)
    p.set_defaults(fn=cmd_rollout_percent)

    p = sub.add_parser("shadow", help="mirror queries to a version, or stop (--clear)",
                       description="Run PERCENT% of queries on VERSION too, after answering them; "
                                   "its answers are compared, never returned. --clear stops it.")
    p.add_argument("index")
    p.add_argument("version", nargs="?")
    p.add_argument("--percent", type=int, default=100)
    p.add_argument("--clear", action="store_true", help="stop shadowing")
    change(p)
    p.set_defaults(fn=cmd_rollout_shadow)

    for name, helptext, fn in (
            ("promote", "make the canary stable (old stable kept as previous)", cmd_rollout_promote),
            ("rollback", "swap stable and previous stable; ends a canary", cmd_rollout_rollback),
            ("abort", "end the canary: all traffic to stable", cmd_rollout_abort)):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("index")
        change(p)
        if name == "promote":
            _policy_opts(p)
        p.set_defaults(fn=fn)

    p = sub.add_parser("stable", help="point stable at a version directly",
                       description="Point stable at VERSION (no canary); the old stable becomes previous.")
    p.add_argument("index")
    p.add_argument("version")
    change(p)
    p.set_defaults(fn=cmd_rollout_stable)

    p = sub.add_parser("status", help="show the rollout and who serves it",
                       description="Show the rollout, replica acknowledgements, shadow statistics, load "
                                   "errors and loaded versions.")
    p.add_argument("index")
    client_opts(p)
    p.set_defaults(fn=cmd_rollout_status)

    p = sub.add_parser("history", help="show the audit log", description="Show rollout changes, newest first.")
    p.add_argument("index")
    p.add_argument("--limit", type=int, default=20)
    client_opts(p)
    p.set_defaults(fn=cmd_rollout_history)


def _policy_opts(p: argparse.ArgumentParser) -> None:
    rules = p.add_argument_group("promote policy", "refuse the promote (exit 1, naming the rule) unless the canary "
                                                   "passes these; evaluations come from `colgrid eval --record`")
    rules.add_argument("--max-ndcg-drop", type=float, metavar="DROP",
                       help="canary nDCG@10 >= stable nDCG@10 - DROP on a query set both were evaluated on")
    rules.add_argument("--min-shadow-overlap", type=float, metavar="OVERLAP",
                       help="mean shadow overlap@k of the canary against stable >= OVERLAP (0..1)")
    rules.add_argument("--min-shadow-compared", type=int, metavar="N",
                       help="at least N shadow comparisons of the canary against stable")


def _default_actor() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return "cli"


# --------------------------------------------------------------------------------------- verbs

def _client(args: argparse.Namespace):

    return connect(args)


def _change(args: argparse.Namespace, method: str, *positional: Any, **extra: Any) -> int:
    with _client(args) as client:
        status = getattr(client, method)(args.index, *positional, expected_generation=args.expected_generation,
                                         actor=args.actor, reason=args.reason, wait_for_replicas=args.wait,
                                         **extra)
    print(format_status(status, waited=args.wait is not None))
    return 0 if args.wait is None or status.acknowledged else 2


def cmd_rollout_start(args: argparse.Namespace) -> int:
    return _change(args, "start_canary", args.version, args.percent)


def cmd_rollout_percent(args: argparse.Namespace) -> int:
    return _change(args, "set_canary_percent", args.percent)


def cmd_rollout_shadow(args: argparse.Namespace) -> int:
    if args.clear:
        if args.version:
            raise ValueError("give a VERSION to shadow, or --clear, not both")
        return _change(args, "clear_shadow")
    if not args.version:
        raise ValueError("name the VERSION to shadow (or --clear to stop shadowing)")
    return _change(args, "set_shadow", args.version, args.percent)


def cmd_rollout_promote(args: argparse.Namespace) -> int:
    return _change(args, "promote", max_ndcg_drop=args.max_ndcg_drop, min_shadow_overlap=args.min_shadow_overlap,
                   min_shadow_compared=args.min_shadow_compared)


def cmd_rollout_rollback(args: argparse.Namespace) -> int:
    return _change(args, "rollback")


def cmd_rollout_abort(args: argparse.Namespace) -> int:
    return _change(args, "abort_canary")


def cmd_rollout_stable(args: argparse.Namespace) -> int:
    return _change(args, "set_stable", args.version)


def cmd_rollout_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(format_status(client.get_rollout(args.index)))
    return 0


def cmd_rollout_history(args: argparse.Namespace) -> int:
    from colgrid_registry.format import format_audit

    with _client(args) as client:
        entries = client.rollout_history(args.index, args.limit)
    print(format_audit([_audit_record(e) for e in entries]))
    return 0


# --------------------------------------------------------------------------------------- views

def format_status(status, *, waited: bool = False) -> str:
    """The rollout (registry view), then replicas, shadow statistics, load errors, versions."""
    from colgrid_registry.format import format_replicas, format_rollout

    rollout = _rollout_record(status.rollout)
    lines = [format_rollout(rollout), ""]
    live = [r for r in status.replicas if r.live]
    if waited and status.pending_replicas:
        lines.append(f"replicas: {len(status.pending_replicas)} of {len(live)} live not serving generation "
                     f"{rollout.generation} yet: {', '.join(status.pending_replicas)}")
    else:
        acked = sum(1 for r in live if r.acknowledged)
        lines.append(f"replicas: {acked} of {len(live)} live serving generation {rollout.generation}")
    lines.append(format_replicas([_replica_record(r, rollout.index) for r in status.replicas], rollout=rollout))
    served = "-" if status.served_generation is None else status.served_generation
    lines += ["", f"on {status.replica_id or 'this server'} (serving generation {served}):"]
    held = [f"{v.version} ({'draining' if v.draining else ', '.join(v.roles) or 'prepared'}, "
            f"{v.in_flight} in flight)" for v in status.versions]
    lines.append(f"  loaded: {'; '.join(held) or '-'}")
    for s in status.shadow_stats:
        lines.append(f"  shadow {s.primary} -> {s.shadow}: {s.compared} compared of {s.sampled} sampled, "
                     f"{s.errors} errors, {s.dropped} shed; overlap@k {s.mean_overlap:.3f}, "
                     f"rank correlation {s.mean_rank_correlation:.3f}; p50/p95 ms "
                     f"{s.primary_p50_ms:.1f}/{s.primary_p95_ms:.1f} vs {s.shadow_p50_ms:.1f}/{s.shadow_p95_ms:.1f}"
                     + (f"; last error: {s.last_error}" if s.last_error else ""))
    for e in status.load_errors:
        lines.append(f"  load error: {e.version} failed the {e.check!r} check (generation {e.generation}): "
                     f"{e.message}")
    return "\n".join(lines)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text) if text else _EPOCH


def _pointers(r) -> dict[str, Any]:
    return {"stable": r.stable, "canary": r.canary, "canary_percent": r.canary_percent, "shadow": r.shadow,
            "shadow_percent": r.shadow_percent, "previous_stable": r.previous_stable, "generation": r.generation}


def _rollout_record(r):
    from colgrid_registry import Rollout

    return Rollout(index=r.index, updated_at=_time(r.updated_at), **_pointers(r))


def _replica_record(r, index: str):
    from colgrid_registry import ReplicaRecord

    return ReplicaRecord(replica_id=r.replica_id, address=r.address, last_seen=_time(r.last_seen),
                         served={} if r.generation is None else {index: r.generation}, live=r.live)


def _audit_record(e):
    from colgrid_registry import AuditEntry

    return AuditEntry(id=e.id, index=e.index, at=_time(e.at), actor=e.actor, action=e.action, reason=e.reason,
                      before=_pointers(e.before), after=_pointers(e.after))
