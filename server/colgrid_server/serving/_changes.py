"""Rollout changes made through this server: check the version first, then change the registry,
then apply the change here at once (other replicas apply it on their next poll).

A change that would send traffic to a version (start canary, set canary percent, set shadow,
promote, rollback, set stable) first runs every load check on that version (see CHECKS) and
keeps it loaded and warm, so the snapshot published right after the registry commit routes to a
version that has already answered a query. If a check fails, the registry is not touched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from colgrid_registry import GenerationConflict, Rollout
from colgrid_server.errors import InvalidArgument
from colgrid_server.serving._replica import Replica
from colgrid_server.serving._state import ServingState

# A change without expected_generation is still made against the rollout its target was checked
# on; if another change lands in between, it is re-read and re-checked this many times.
ATTEMPTS = 3
DEFAULT_ACTOR = "api"

Target = Callable[[Rollout], str | None]


@dataclass(frozen=True)
class Change:
    """Who asks for a change and on what condition."""

    expected_generation: int | None = None
    actor: str = DEFAULT_ACTOR
    reason: str = ""


class RolloutChanges:
    def __init__(self, state: ServingState, replica: Replica) -> None:
        self._state = state
        self._registry = state.registry
        self._replica = replica

    def start_canary(self, index: str, version: str, percent: int, change: Change) -> Rollout:
        return self._apply(index, "start_canary", lambda _: version, change, version, _percent(percent))

    def set_canary_percent(self, index: str, percent: int, change: Change) -> Rollout:
        return self._apply(index, "set_canary_percent", lambda r: r.canary, change, _percent(percent))

    def set_shadow(self, index: str, version: str, percent: int, change: Change) -> Rollout:
        return self._apply(index, "set_shadow", lambda _: version, change, version, _percent(percent))

    def clear_shadow(self, index: str, change: Change) -> Rollout:
        return self._apply(index, "clear_shadow", lambda _: None, change)

    def promote(self, index: str, change: Change) -> Rollout:
        return self._apply(index, "promote", lambda r: r.canary, change)

    def rollback(self, index: str, change: Change) -> Rollout:
        return self._apply(index, "rollback", lambda r: r.previous_stable, change)

    def abort_canary(self, index: str, change: Change) -> Rollout:
        return self._apply(index, "abort_canary", lambda _: None, change)

    def set_stable(self, index: str, version: str, change: Change) -> Rollout:
        return self._apply(index, "set_stable", lambda _: version, change, version)

    def _apply(self, index: str, operation: str, target: Target, change: Change, *arguments: object) -> Rollout:
        """Check target(rollout), then registry.<operation>(index, *arguments) as a
        compare-and-set on the generation the check saw; then serve and report it here."""
        for attempt in range(ATTEMPTS):
            before = self._registry.get_rollout(index)
            expected = change.expected_generation
            if expected is not None and expected != before.generation:
                raise GenerationConflict(index, expected=expected, actual=before.generation)
            version = target(before)
            checked = self._state.prepared(index, version) if version else contextlib.nullcontext()
            with checked:
                try:
                    after = getattr(self._registry, operation)(
                        index, *arguments, expected_generation=before.generation,
                        actor=change.actor or DEFAULT_ACTOR, reason=change.reason)
                except GenerationConflict:
                    if expected is not None or attempt == ATTEMPTS - 1:
                        raise
                    continue
                self._state.refresh()
            self._replica.heartbeat()
            return after
        raise AssertionError("unreachable: the last attempt returns or raises")


def _percent(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise InvalidArgument(f"percent must be an integer from 0 to 100, got {value!r}", field="percent")
    return value
