"""Replicas report, by heartbeat, which rollout generation of each index they serve."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from colgrid_registry import InvalidName, InvalidValue, Registry, ReplicaRecord, open_registry


@pytest.fixture
def reg(tmp_path: Path):
    with open_registry(tmp_path / "registry.db") as registry:
        yield registry


def test_a_heartbeat_makes_a_live_replica_with_what_it_serves(reg: Registry) -> None:
    reg.heartbeat("replica-a", address="10.0.0.1:50051", served={"docs": 7, "faq": 2})
    (replica,) = reg.list_replicas()
    assert (replica.replica_id, replica.address, replica.served, replica.live) == (
        "replica-a", "10.0.0.1:50051", {"docs": 7, "faq": 2}, True)
    assert replica.last_seen.tzinfo == timezone.utc


def test_a_later_heartbeat_replaces_address_served_and_last_seen(reg: Registry) -> None:
    reg.heartbeat("replica-a", address="old:1", served={"docs": 7, "faq": 2})
    (first,) = reg.list_replicas()
    reg.heartbeat("replica-a", address="new:2", served={"docs": 8})
    (second,) = reg.list_replicas()
    assert (second.address, second.served) == ("new:2", {"docs": 8})
    assert second.last_seen > first.last_seen


def test_a_replica_without_a_recent_heartbeat_is_stale(reg: Registry) -> None:
    reg.heartbeat("replica-a", address="a:1", served={})
    time.sleep(0.05)
    assert [r.live for r in reg.list_replicas(live_within_s=0.01)] == [False]
    assert [r.live for r in reg.list_replicas()] == [True]  # default window: 30 s


def test_replicas_are_listed_by_id_and_shared_through_the_file(reg: Registry) -> None:
    with open_registry(reg.path) as other:
        other.heartbeat("replica-b", address="b:1", served={"docs": 1})
        reg.heartbeat("replica-a", address="a:1", served={"docs": 1})
        assert [r.replica_id for r in other.list_replicas()] == ["replica-a", "replica-b"]
        assert other.list_replicas() == [
            ReplicaRecord(r.replica_id, r.address, r.last_seen, r.served, True) for r in reg.list_replicas()]


def test_forget_replica_removes_it_and_says_whether_it_existed(reg: Registry) -> None:
    reg.heartbeat("replica-a", address="a:1", served={})
    reg.heartbeat("replica-b", address="b:1", served={})
    assert reg.forget_replica("replica-a") is True
    assert reg.forget_replica("replica-a") is False
    assert [r.replica_id for r in reg.list_replicas()] == ["replica-b"]


def test_a_replica_acknowledges_its_generation_and_every_earlier_one() -> None:
    replica = ReplicaRecord("r", "a:1", datetime.now(timezone.utc), {"docs": 5}, True)
    assert replica.acknowledges("docs", 5) and replica.acknowledges("docs", 4)
    assert not replica.acknowledges("docs", 6)
    assert not replica.acknowledges("other", 0)


@pytest.mark.parametrize("kwargs, field", [
    ({"replica_id": ""}, "replica_id"),
    ({"address": " "}, "address"),
    ({"served": [("docs", 1)]}, "served"),
    ({"served": {"docs": -1}}, "served['docs']"),
    ({"served": {"docs": "7"}}, "served['docs']"),
    ({"served": {"docs": True}}, "served['docs']"),
])
def test_heartbeat_refuses_malformed_values_and_stores_nothing(reg: Registry, kwargs: dict, field: str) -> None:
    call = {"replica_id": "replica-a", "address": "a:1", "served": {"docs": 1}, **kwargs}
    with pytest.raises(InvalidValue) as caught:
        reg.heartbeat(call.pop("replica_id"), **call)
    assert caught.value.field == field
    assert reg.list_replicas() == []


def test_heartbeat_refuses_an_invalid_index_name(reg: Registry) -> None:
    with pytest.raises(InvalidName):
        reg.heartbeat("replica-a", address="a:1", served={"../etc": 1})


@pytest.mark.parametrize("window", [0, -1.0, float("nan"), float("inf"), "30", True])
def test_list_replicas_refuses_a_window_that_is_not_a_positive_number(reg: Registry, window: object) -> None:
    with pytest.raises(InvalidValue) as caught:
        reg.list_replicas(live_within_s=window)
    assert caught.value.field == "live_within_s"


def test_replicas_silent_for_longer_than_the_window_are_forgotten(reg: Registry) -> None:
    reg.heartbeat("killed-b", address="b:1", served={"docs": 1})
    reg.heartbeat("killed-a", address="a:1", served={})
    time.sleep(0.2)
    reg.heartbeat("alive", address="c:1", served={"docs": 1})
    assert reg.forget_stale_replicas(older_than_s=0.1) == ["killed-a", "killed-b"]
    assert [r.replica_id for r in reg.list_replicas()] == ["alive"]
    assert reg.forget_stale_replicas(older_than_s=0.1) == []
    with pytest.raises(InvalidValue, match="older_than_s"):
        reg.forget_stale_replicas(older_than_s=0)
