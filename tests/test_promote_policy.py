"""Promote gated by a policy: refused (FAILED_PRECONDITION, the rule in ErrorInfo metadata and
message) when the canary scores worse than stable, its shadow overlap is too low, or the
evidence is missing; allowed when every rule passes. A refusal changes nothing."""
from __future__ import annotations

import grpc
import pytest

from colgrid_client import AbortedError, FailedPreconditionError, PromotePolicy as ClientPolicy
from colgrid_server.errors import InvalidArgument
from colgrid_server.evaluation import Evaluation, PromotePolicy, check_policy
from colgrid_server.serving import ShadowStats
from tests.test_evaluation_support import (  # noqa: F401 - fixtures
    INDEX, eval_template, eval_versions, queries, rollout_documents, serving, tiny_checkpoint, tiny_encoder_dir)


# --- the rules, on values --------------------------------------------------------------------

def evaluation(version: str, ndcg: float, query_set: str = "dev") -> Evaluation:
    return Evaluation(INDEX, version, query_set, {"ndcg@10": ndcg, "recall@100": 0.9, "queries": 50.0})


def shadow(compared: int, overlap: float, primary: str = "v1", shadow_version: str = "v2") -> ShadowStats:
    return ShadowStats(index=INDEX, primary=primary, shadow=shadow_version, sampled=compared, compared=compared,
                       errors=0, dropped=0, mean_overlap=overlap, mean_rbo=overlap, primary_p50_ms=1.0,
                       primary_p95_ms=1.0, shadow_p50_ms=1.0, shadow_p95_ms=1.0)


def check(policy: PromotePolicy, stable=(), canary=(), shadows=()):
    return check_policy(policy, index=INDEX, stable="v1", canary="v2", stable_evaluations=list(stable),
                        canary_evaluations=list(canary), shadow=list(shadows))


def test_a_canary_within_the_allowed_ndcg_drop_passes():
    policy = PromotePolicy(max_ndcg_drop=0.01)
    assert check(policy, [evaluation("v1", 0.650)], [evaluation("v2", 0.641)]) is None
    assert check(PromotePolicy(max_ndcg_drop=0.0), [evaluation("v1", 0.65)], [evaluation("v2", 0.65)]) is None


def test_a_canary_below_stable_minus_the_drop_fails_naming_both_scores_and_the_query_set():
    failure = check(PromotePolicy(max_ndcg_drop=0.01), [evaluation("v1", 0.650)], [evaluation("v2", 0.612)])
    assert failure.rule == "max_ndcg_drop"
    assert failure.message == "rule max_ndcg_drop: canary v2 nDCG@10 0.612 < stable v1 0.650 - 0.010 on query set 'dev'"


def test_the_ndcg_rule_compares_the_newest_canary_evaluation_on_a_query_set_stable_shares():
    stable = [evaluation("v1", 0.90, "test"), evaluation("v1", 0.60, "dev"), evaluation("v1", 0.10, "dev")]
    canary = [evaluation("v2", 0.95, "other"), evaluation("v2", 0.595, "dev"), evaluation("v2", 0.20, "dev")]
    # v2's newest on a shared set is 0.595 on dev; v1's newest on dev is 0.60 (0.10 is older).
    assert check(PromotePolicy(max_ndcg_drop=0.01), stable, canary) is None
    assert check(PromotePolicy(max_ndcg_drop=0.001), stable, canary).rule == "max_ndcg_drop"


def test_without_an_evaluation_of_stable_the_ndcg_rule_fails_saying_how_to_get_one():
    failure = check(PromotePolicy(max_ndcg_drop=0.01), [], [evaluation("v2", 0.9)])
    assert failure.rule == "max_ndcg_drop"
    assert "no evaluation of stable v1" in failure.message and "colgrid eval docs" in failure.message


def test_without_a_canary_evaluation_on_stables_query_set_the_ndcg_rule_fails():
    failure = check(PromotePolicy(max_ndcg_drop=0.01), [evaluation("v1", 0.6, "dev")],
                    [evaluation("v2", 0.9, "other")])
    assert failure.message.startswith("rule max_ndcg_drop: no evaluation of canary v2 on the query set stable v1 "
                                      "was evaluated on ('dev')")


def test_shadow_rules_need_enough_comparisons_of_canary_against_stable():
    policy = PromotePolicy(min_shadow_overlap=0.8, min_shadow_compared=20)
    assert check(policy, shadows=[shadow(25, 0.85)]) is None
    few = check(policy, shadows=[shadow(5, 0.95)])
    assert few.rule == "min_shadow_compared" and "5 shadow comparisons of canary v2 against stable v1" in few.message
    low = check(policy, shadows=[shadow(25, 0.70)])
    assert low.rule == "min_shadow_overlap"
    assert low.message == ("rule min_shadow_overlap: canary v2 shadow overlap@k 0.700 < 0.800 over 25 comparisons "
                           "with stable v1")


def test_shadow_statistics_of_another_version_pair_do_not_count():
    failure = check(PromotePolicy(min_shadow_overlap=0.5), shadows=[shadow(100, 1.0, "v1", "v3"),
                                                                    shadow(100, 1.0, "v2", "v2")])
    assert failure.rule == "min_shadow_overlap" and "no shadow comparisons" in failure.message


def test_the_ndcg_rule_is_checked_first():
    failure = check(PromotePolicy(max_ndcg_drop=0.0, min_shadow_overlap=0.9), [evaluation("v1", 0.9)],
                    [evaluation("v2", 0.5)], [shadow(10, 0.1)])
    assert failure.rule == "max_ndcg_drop"


@pytest.mark.parametrize("rules", [{"max_ndcg_drop": -0.1}, {"min_shadow_overlap": 1.5},
                                   {"min_shadow_overlap": float("nan")}, {"min_shadow_compared": -1}])
def test_a_policy_out_of_range_is_an_invalid_argument(rules):
    with pytest.raises(InvalidArgument, match="policy"):
        PromotePolicy(**rules)


# --- on a live server --------------------------------------------------------------------------

def refused(s, **rules) -> FailedPreconditionError:
    before = s.client.get_rollout(INDEX).rollout
    history = s.client.rollout_history(INDEX)
    with pytest.raises(FailedPreconditionError) as info:
        s.client.promote(INDEX, **rules)
    assert s.client.get_rollout(INDEX).rollout == before, "a refused promote must change nothing"
    assert s.client.rollout_history(INDEX) == history
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.reason == "PROMOTE_POLICY"
    return info.value


def search_traffic(s, queries, n: int = 24) -> None:
    for i in range(n):
        s.client.search(INDEX, queries[i % len(queries)]["query"], k=10, routing_key=f"user-{i}")
    assert s.state.shadow.drain()


def test_promote_is_refused_when_the_canary_scores_worse_than_stable(eval_versions, queries):
    with serving(eval_versions) as s:
        s.client.start_canary(INDEX, "v2", 10)
        s.client.evaluate(INDEX, queries, versions=["v1", "v2"], query_set="dev", record=True)
        error = refused(s, max_ndcg_drop=0.01)
    assert error.error_metadata["rule"] == "max_ndcg_drop"
    assert "rule max_ndcg_drop: canary v2 nDCG@10" in error.details and "on query set 'dev'" in error.details


def test_promote_is_refused_when_the_canary_was_never_evaluated(eval_versions, queries):
    with serving(eval_versions) as s:
        s.client.evaluate(INDEX, queries, versions=["v1"], query_set="dev", record=True)
        s.client.start_canary(INDEX, "v3", 10)
        error = refused(s, policy=ClientPolicy(max_ndcg_drop=0.01))
    assert error.error_metadata["rule"] == "max_ndcg_drop"
    assert "no evaluation of canary v3 on the query set stable v1 was evaluated on ('dev')" in error.details


def test_promote_is_refused_when_shadow_overlap_is_too_low(eval_versions, queries):
    """v2 lacks half of v1's documents: shadowed against stable, its top 10 differs."""
    with serving(eval_versions) as s:
        s.client.set_shadow(INDEX, "v2")
        s.client.start_canary(INDEX, "v2", 0)
        search_traffic(s, queries)
        (pair,) = [x for x in s.client.get_rollout(INDEX).shadow_stats if (x.primary, x.shadow) == ("v1", "v2")]
        error = refused(s, min_shadow_overlap=0.99)
    assert pair.compared == 24 and pair.mean_overlap < 0.99
    assert error.error_metadata["rule"] == "min_shadow_overlap"
    assert f"shadow overlap@k {pair.mean_overlap:.3f} < 0.990 over 24 comparisons" in error.details


def test_promote_is_refused_without_enough_shadow_comparisons(eval_versions, queries):
    with serving(eval_versions) as s:
        s.client.start_canary(INDEX, "v3", 10)
        error = refused(s, min_shadow_overlap=0.8, min_shadow_compared=10)
    assert error.error_metadata["rule"] == "min_shadow_compared"
    assert "0 shadow comparisons of canary v3 against stable v1" in error.details


def test_promote_goes_ahead_when_every_rule_passes(eval_versions, queries):
    """v3 is v1's twin: the same scores, and full overlap in the shadow."""
    with serving(eval_versions) as s:
        s.client.evaluate(INDEX, queries, versions=["v1", "v3"], query_set="dev", record=True)
        s.client.set_shadow(INDEX, "v3")
        s.client.start_canary(INDEX, "v3", 0)
        search_traffic(s, queries)
        status = s.client.promote(INDEX, max_ndcg_drop=0.0, min_shadow_overlap=0.8, min_shadow_compared=20,
                                  reason="gated")
        (entry, *_) = s.client.rollout_history(INDEX)
    assert (status.rollout.stable, status.rollout.canary, status.rollout.previous_stable) == ("v3", None, "v1")
    assert (entry.action, entry.reason) == ("promote", "gated")


def test_promote_without_a_policy_is_not_gated(eval_versions):
    with serving(eval_versions) as s:
        s.client.start_canary(INDEX, "v2", 10)
        status = s.client.promote(INDEX)
    assert status.rollout.stable == "v2"


def test_a_stale_expected_generation_is_a_conflict_before_any_rule_is_checked(eval_versions):
    with serving(eval_versions) as s:
        generation = s.client.start_canary(INDEX, "v2", 10).rollout.generation
        with pytest.raises(AbortedError):
            s.client.promote(INDEX, max_ndcg_drop=0.01, expected_generation=generation - 1)
        assert s.client.get_rollout(INDEX).rollout.stable == "v1"


def test_a_policy_with_a_rule_out_of_range_is_an_invalid_argument(eval_versions):
    from colgrid_client import InvalidArgumentError

    with serving(eval_versions) as s:
        s.client.start_canary(INDEX, "v2", 10)
        with pytest.raises(InvalidArgumentError) as info:
            s.client.promote(INDEX, min_shadow_overlap=2.0)
        assert s.client.get_rollout(INDEX).rollout.stable == "v1"
    assert [v.field for v in info.value.field_violations] == ["policy.min_shadow_overlap"]


def test_a_policy_and_its_rules_as_keywords_are_not_both_accepted(eval_versions):
    from colgrid_client import InvalidArgumentError

    with serving(eval_versions) as s, pytest.raises(InvalidArgumentError, match="not both"):
        s.client.promote(INDEX, policy=ClientPolicy(max_ndcg_drop=0.1), min_shadow_overlap=0.5)
