"""Argument checks, run before any transaction starts: a bad value costs no lock and names its
field (`InvalidValue.field`) so the server can report a field violation."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from colgrid_registry._names import check_name
from colgrid_registry.errors import InvalidValue

_SHA256 = re.compile(r"[0-9a-f]{64}")


def text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"{field} must be a non-empty string, got {value!r}", field=field)
    return value


def count(value: object, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValue(f"{field} must be an integer >= {minimum}, got {value!r}", field=field)
    return value


def percent(value: object, field: str = "percent") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise InvalidValue(f"{field} must be an integer from 0 to 100, got {value!r}", field=field)
    return value


def positive_seconds(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidValue(f"{field} must be a positive number of seconds, got {value!r}", field=field)
    return float(value)


def sha256(value: object) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidValue(f"manifest_sha256 must be 64 lowercase hex digits, got {value!r}",
                           field="manifest_sha256")
    return value


def audit_fields(actor: object, reason: object) -> tuple[str, str]:
    if not isinstance(reason, str):
        raise InvalidValue(f"reason must be a string, got {type(reason).__name__}", field="reason")
    return text(actor, "actor"), reason


def expected_generation(value: object) -> int | None:
    return None if value is None else count(value, "expected_generation")


def served(value: object) -> str:
    """{index: generation} from a heartbeat, as the JSON text stored for it."""
    if not isinstance(value, Mapping):
        raise InvalidValue(f"served must be a mapping of index name to generation, got "
                           f"{type(value).__name__}", field="served")
    for index, generation in value.items():
        check_name(index, kind="index")
        count(generation, f"served[{index!r}]")
    return json.dumps(dict(value), sort_keys=True)


def metrics(value: object) -> str:
    """A non-empty {name: finite number} mapping, as the JSON text stored for it."""
    if not isinstance(value, Mapping) or not value:
        raise InvalidValue(f"metrics must be a non-empty mapping of metric name to number, got {value!r}",
                           field="metrics")
    clean: dict[str, float] = {}
    for name, number in value.items():
        text(name, "metrics")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise InvalidValue(f"metric {name!r} must be a finite number, got {number!r}", field="metrics")
        clean[name] = float(number)
    return json.dumps(clean, sort_keys=True)


def new_version_values(encoder_id: str, encoder_kind: str, dim: int, storage_uri: str | None,
                       build_params: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(build_params, Mapping):
        raise InvalidValue(f"build_params must be a mapping, got {type(build_params).__name__}",
                           field="build_params")
    try:
        params = json.dumps(dict(build_params), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(f"build_params must be JSON-serialisable: {exc}", field="build_params") from exc
    return {"encoder_id": text(encoder_id, "encoder_id"), "encoder_kind": text(encoder_kind, "encoder_kind"),
            "dim": count(dim, "dim", minimum=1),
            "storage_uri": text(storage_uri, "storage_uri") if storage_uri else None,
            "build_params": params}
