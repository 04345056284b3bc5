"""Plain-text views of registry records for the CLI (`colgrid registry list|show`,
`colgrid rollout status|history`, `colgrid eval`). Times are shown in UTC to the second; absent
values as "-"."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from colgrid_registry._records import (
    AuditEntry, EvaluationRecord, IndexRecord, ReplicaRecord, Rollout, VersionRecord)


def format_indexes(indexes: Sequence[IndexRecord], rollouts: Mapping[str, Rollout]) -> str:
    """One row per index with its rollout pointers; `rollouts` is keyed by index name."""
    if not indexes:
        return "(no indexes)"
    rows = []
    for record in indexes:
        r = rollouts.get(record.name)
        rows.append([record.name, _cell(r and r.stable), _percent(r and r.canary, r and r.canary_percent),
                     _percent(r and r.shadow, r and r.shadow_percent), _cell(r and r.previous_stable),
                     _cell(r and r.generation), _time(record.created_at)])
    return _table(["INDEX", "STABLE", "CANARY", "SHADOW", "PREVIOUS", "GENERATION", "CREATED"], rows,
                  right={5})


def format_versions(versions: Sequence[VersionRecord], rollout: Rollout | None) -> str:
    """One row per version; ROLE says which rollout pointers name it, and `*` marks stable."""
    if not versions:
        return "(no versions)"
    rows = []
    for v in versions:
        roles = rollout.roles(v.version) if rollout is not None else []
        marker = "*" if "stable" in roles else " "
        rows.append([f"{marker} {v.version}", v.state.value, ",".join(roles) or "-", v.encoder_kind,
                     str(v.dim), _cell(v.documents), _cell(v.tokens), _time(v.created_at)])
    return _table(["  VERSION", "STATE", "ROLE", "ENCODER", "DIM", "DOCUMENTS", "TOKENS", "CREATED"], rows,
                  right={4, 5, 6})


def format_version(version: VersionRecord) -> str:
    """Every field of one version, one `key: value` line each."""
    fields = [
        ("index", version.index), ("version", version.version), ("state", version.state.value),
        ("encoder_id", version.encoder_id), ("encoder_kind", version.encoder_kind), ("dim", version.dim),
        ("documents", version.documents), ("tokens", version.tokens), ("storage_uri", version.storage_uri),
        ("manifest_sha256", version.manifest_sha256),
        ("build_params", json.dumps(dict(version.build_params), sort_keys=True)),
        ("created_at", _time(version.created_at)), ("updated_at", _time(version.updated_at)),
        ("error", version.error),
    ]
    return _fields(fields)


def format_rollout(rollout: Rollout) -> str:
    """The pointers of one index alias, one `key: value` line each."""
    return _fields([
        ("index", rollout.index), ("generation", rollout.generation), ("stable", rollout.stable),
        ("canary", _percent(rollout.canary, rollout.canary_percent)),
        ("shadow", _percent(rollout.shadow, rollout.shadow_percent)),
        ("previous_stable", rollout.previous_stable), ("updated_at", _time(rollout.updated_at)),
    ])


def format_audit(entries: Sequence[AuditEntry]) -> str:
    """One row per rollout change, in the order given (audit_log: newest first). GEN is the
    generation the change produced; CHANGES lists the pointers it moved."""
    if not entries:
        return "(no rollout changes)"
    rows = [[_cell(e.after.get("generation")), _time(e.at), e.action, _one_line(e.actor),
             _changes(e.before, e.after), _one_line(e.reason) or "-"] for e in entries]
    return _table(["GEN", "AT", "ACTION", "ACTOR", "CHANGES", "REASON"], rows, right={0})


def format_replicas(replicas: Sequence[ReplicaRecord], *, rollout: Rollout | None = None) -> str:
    """One row per replica: live or stale, when last seen, and the generation it serves of
    each index. With `rollout`, ACK says whether the replica has applied its generation."""
    if not replicas:
        return "(no replicas)"
    headers = ["REPLICA", "ADDRESS", "STATE", "LAST SEEN", "SERVES"] + (["ACK"] if rollout else [])
    rows = []
    for r in replicas:
        serves = ", ".join(f"{index}@{generation}" for index, generation in sorted(r.served.items()))
        row = [r.replica_id, r.address, "live" if r.live else "stale", _time(r.last_seen), serves or "-"]
        if rollout is not None:
            row.append(_acknowledgement(r, rollout))
        rows.append(row)
    return _table(headers, rows)


def format_evaluations(evaluations: Sequence[EvaluationRecord]) -> str:
    """One row per evaluation of a version, metrics as name=value sorted by name."""
    if not evaluations:
        return "(no evaluations)"
    rows = [[_time(e.at), e.query_set, e.actor,
             " ".join(f"{name}={_number(value)}" for name, value in sorted(e.metrics.items()))]
            for e in evaluations]
    return _table(["AT", "QUERY SET", "ACTOR", "METRICS"], rows)


def _acknowledgement(replica: ReplicaRecord, rollout: Rollout) -> str:
    if replica.acknowledges(rollout.index, rollout.generation):
        return "yes"
    applied = replica.served.get(rollout.index)
    return "no (not serving)" if applied is None else f"no (serves {applied})"


def _changes(before: Mapping[str, object], after: Mapping[str, object]) -> str:
    moved = [f"{key}: {_cell(before.get(key))} -> {_cell(after.get(key))}"
             for key in after if key != "generation" and before.get(key) != after.get(key)]
    return "; ".join(moved) or "-"


def _fields(fields: list[tuple[str, object]]) -> str:
    width = max(len(key) for key, _ in fields)
    return "\n".join(f"{key + ':':<{width + 1}} {_cell(value)}" for key, value in fields)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _number(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _percent(version: str | None, percent: int | None) -> str:
    return "-" if not version else f"{version} ({percent}%)"


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _table(headers: list[str], rows: list[list[str]], *, right: frozenset[int] | set[int] = frozenset()) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join(line(row) for row in [headers, *rows])
