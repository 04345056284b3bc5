"""The SDK's rollout surface without a server: request building, validation, conversion."""
from __future__ import annotations

import pytest

import colgrid_client.rollout as rollout_values
from colgrid_client import InvalidArgumentError, Rollout
from colgrid_client import _base as base
from colgrid_client import _convert as convert
from colgrid_client._pb import colgrid_pb2 as pb


def test_a_change_request_carries_the_audit_fields_and_leaves_unset_options_unset():
    bare = convert.promote_request("docs")
    assert not bare.HasField("expected_generation") and not bare.HasField("wait_for_replicas_s")
    full = convert.start_canary_request("docs", "v2", 25, expected_generation=0, actor="alice", reason="why",
                                        wait_for_replicas=1.5)
    assert (full.index, full.version, full.percent, full.actor, full.reason) == ("docs", "v2", 25, "alice", "why")
    assert full.HasField("expected_generation") and full.expected_generation == 0
    assert full.wait_for_replicas_s == 1.5


@pytest.mark.parametrize("build", [
    lambda: convert.start_canary_request("docs", "v2", 101),
    lambda: convert.set_canary_percent_request("docs", -1),
    lambda: convert.set_shadow_request("docs", "v2", True),
    lambda: convert.rollback_request("docs", expected_generation=-1),
    lambda: convert.abort_canary_request("docs", wait_for_replicas=float("inf")),
    lambda: convert.set_stable_request("docs", 7),
])
def test_bad_change_arguments_are_refused_before_sending(build):
    with pytest.raises(InvalidArgumentError):
        build()


def test_a_replica_wait_stretches_the_default_deadline_but_never_the_callers():
    assert base.change_timeout(None, 30.0, None) is None  # the client default applies
    assert base.change_timeout(None, 30.0, 60.0) == 60.0 + base.CHANGE_MARGIN_S
    assert base.change_timeout(5.0, 30.0, 60.0) == 5.0
    assert base.change_timeout(None, None, 60.0) is None  # no deadline at all


def test_rollout_status_converts_with_unset_generations_as_none():
    message = pb.RolloutStatus(
        rollout=pb.Rollout(index="docs", stable="v1", canary="v2", canary_percent=10, generation=4),
        replicas=[pb.ReplicaAck(replica_id="a", live=True, acknowledged=True, generation=4),
                  pb.ReplicaAck(replica_id="b", live=True)],
        pending_replicas=["b"], replica_id="a",
        shadow_stats=[pb.ShadowStats(primary="v1", shadow="v3", compared=2, mean_overlap=0.5)],
        load_errors=[pb.LoadError(version="v3", check="checksum", message="bad", generation=4)],
        versions=[pb.ServingVersion(version="v1", roles=["stable"], in_flight=2)])
    status = convert.from_rollout_status(message)
    assert status.rollout == Rollout(index="docs", stable="v1", canary="v2", canary_percent=10, generation=4)
    assert [(r.replica_id, r.generation) for r in status.replicas] == [("a", 4), ("b", None)]
    assert status.served_generation is None and not status.acknowledged
    assert status.shadow_stats[0].mean_overlap == 0.5 and status.load_errors[0].check == "checksum"
    assert status.versions[0].roles == ("stable",)


def test_the_rollout_module_exports_its_values_under_its_own_name():
    assert sorted(rollout_values.__all__) == ["AuditEntry", "LoadError", "ReplicaAck", "Rollout", "RolloutStatus",
                                              "ServingVersion", "ShadowStats"]
    for name in rollout_values.__all__:
        expected = "colgrid_client" if name == "Rollout" else "colgrid_client.rollout"
        assert getattr(rollout_values, name).__module__ == expected
