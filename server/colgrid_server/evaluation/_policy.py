"""Promote gating: rules a canary must pass before it becomes stable.

Rules are checked in this order, and the first that fails refuses the promote:

    max_ndcg_drop        canary nDCG@10 >= stable nDCG@10 - max_ndcg_drop, both measured on the
                         same query set: the newest canary evaluation whose query set stable was
                         also evaluated on, against stable's newest evaluation on that set
    min_shadow_compared  at least this many shadow comparisons of (primary stable, shadow canary)
    min_shadow_overlap   their mean overlap@k >= this (and at least one comparison)

Shadow statistics are this server's (each replica counts the shadow queries it ran): promote
through the replica that received the shadowed traffic, or gate on evaluations alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from colgrid_registry import Registry, Rollout
from colgrid_server.errors import FailedPrecondition, InvalidArgument
from colgrid_server.evaluation._results import Evaluation

if TYPE_CHECKING:  # serving loads torch; the policy only reads its ShadowStats values
    from colgrid_server.serving import ShadowStats

RULES = ("max_ndcg_drop", "min_shadow_compared", "min_shadow_overlap")


@dataclass(frozen=True)
class PromotePolicy:
    """Rules a promote must pass; None: not checked."""

    max_ndcg_drop: float | None = None
    min_shadow_overlap: float | None = None
    min_shadow_compared: int | None = None

    def __post_init__(self) -> None:
        for name, low, high in (("max_ndcg_drop", 0.0, 1.0), ("min_shadow_overlap", 0.0, 1.0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not low <= value <= high):
                raise InvalidArgument(f"policy.{name} must be a number from {low:g} to {high:g}, got {value!r}",
                                      field=f"policy.{name}")
        compared = self.min_shadow_compared
        if compared is not None and (isinstance(compared, bool) or not isinstance(compared, int) or compared < 0):
            raise InvalidArgument(f"policy.min_shadow_compared must be an integer >= 0, got {compared!r}",
                                  field="policy.min_shadow_compared")

    @property
    def empty(self) -> bool:
        return self.max_ndcg_drop is None and self.min_shadow_overlap is None and self.min_shadow_compared is None


@dataclass(frozen=True)
class PolicyFailure:
    rule: str      # one of RULES
    message: str   # starts with "rule <name>: "


class PromoteRefused(FailedPrecondition):
    """A promote refused by its policy; `rule` names the rule that failed (ErrorInfo metadata)."""

    code = "PROMOTE_POLICY"

    def __init__(self, failure: PolicyFailure) -> None:
        super().__init__(failure.message)
        self.rule = failure.rule


def check_policy(policy: PromotePolicy, *, index: str, stable: str, canary: str,
                 stable_evaluations: Sequence[Evaluation], canary_evaluations: Sequence[Evaluation],
                 shadow: Sequence[ShadowStats]) -> PolicyFailure | None:
    """The first rule of `policy` that promoting `canary` over `stable` fails, or None.
    Evaluations are newest first (as the registry lists them)."""
    if policy.max_ndcg_drop is not None:
        failure = _ndcg_rule(policy.max_ndcg_drop, index, stable, canary, stable_evaluations, canary_evaluations)
        if failure is not None:
            return failure
    if policy.min_shadow_compared is None and policy.min_shadow_overlap is None:
        return None
    pair = next((s for s in shadow if (s.index, s.primary, s.shadow) == (index, stable, canary)), None)
    compared = pair.compared if pair is not None else 0
    what = f"shadow comparisons of canary {canary} against stable {stable} on this server"
    how = f"shadow it (`colgrid rollout shadow {index} {canary}`) and let traffic run"
    if policy.min_shadow_compared is not None and compared < policy.min_shadow_compared:
        return PolicyFailure("min_shadow_compared", f"rule min_shadow_compared: {compared} {what}; the policy needs "
                                                    f"{policy.min_shadow_compared}: {how}")
    if policy.min_shadow_overlap is not None:
        if pair is None or compared == 0:
            return PolicyFailure("min_shadow_overlap", f"rule min_shadow_overlap: no {what}: {how}")
        if pair.mean_overlap < policy.min_shadow_overlap:
            return PolicyFailure("min_shadow_overlap", f"rule min_shadow_overlap: canary {canary} shadow overlap@k "
                                                       f"{pair.mean_overlap:.3f} < {policy.min_shadow_overlap:.3f} "
                                                       f"over {compared} comparisons with stable {stable}")
    return None


def _ndcg_rule(drop: float, index: str, stable: str, canary: str, stable_evaluations: Sequence[Evaluation],
               canary_evaluations: Sequence[Evaluation]) -> PolicyFailure | None:
    how = f"run `colgrid eval {index} QUERIES.jsonl --version {stable} --version {canary} --record`"
    stable_by_set: dict[str, Evaluation] = {}
    for e in stable_evaluations:
        if e.has_ndcg:
            stable_by_set.setdefault(e.query_set, e)  # newest first: keep the newest per set
    if not stable_by_set:
        return PolicyFailure("max_ndcg_drop", f"rule max_ndcg_drop: no evaluation of stable {stable} to compare "
                                              f"the canary with: {how}")
    pair = next(((c, stable_by_set[c.query_set]) for c in canary_evaluations
                 if c.has_ndcg and c.query_set in stable_by_set), None)
    if pair is None:
        sets = ", ".join(repr(s) for s in stable_by_set)
        return PolicyFailure("max_ndcg_drop", f"rule max_ndcg_drop: no evaluation of canary {canary} on the query "
                                              f"set stable {stable} was evaluated on ({sets}): {how}")
    c, s = pair
    # A hair of tolerance so equal scores read back from storage never fail a zero-drop rule.
    if c.ndcg_at_10 < s.ndcg_at_10 - drop - 1e-12:
        return PolicyFailure("max_ndcg_drop", f"rule max_ndcg_drop: canary {canary} nDCG@10 {c.ndcg_at_10:.3f} < "
                                              f"stable {stable} {s.ndcg_at_10:.3f} - {drop:.3f} on query set "
                                              f"{c.query_set!r}")
    return None


def gate_promotion(registry: Registry, rollout: Rollout, policy: PromotePolicy,
                   shadow: Sequence[ShadowStats]) -> None:
    """Raise PromoteRefused if promoting `rollout`'s canary fails `policy`. Without a canary
    there is nothing to gate (the promote itself refuses)."""
    if policy.empty or not rollout.canary or not rollout.stable:
        return
    index, stable, canary = rollout.index, rollout.stable, rollout.canary
    failure = check_policy(
        policy, index=index, stable=stable, canary=canary,
        stable_evaluations=[Evaluation.from_record(r) for r in registry.evaluations(index, stable)],
        canary_evaluations=[Evaluation.from_record(r) for r in registry.evaluations(index, canary)],
        shadow=shadow)
    if failure is not None:
        raise PromoteRefused(failure)
