"""Plain-text views of registry records for the CLI (`colgrid registry list|show`).
Times are shown in UTC to the second; absent values as "-"."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from colgrid_registry._records import IndexRecord, Rollout, VersionRecord


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
    width = max(len(key) for key, _ in fields)
    return "\n".join(f"{key + ':':<{width + 1}} {_cell(value)}" for key, value in fields)


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
