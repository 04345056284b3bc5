"""A server's heartbeats also drop replicas that went silent long ago: a killed process never
removes itself from the registry's replica list, and Kubernetes pods come back under new names."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from colgrid_registry import open_registry
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.config import Settings
from colgrid_server.errors import InvalidArgument
from colgrid_server.serving import Replica, ServingState


def _replica(tmp_path: Path, registry, forget_after_s: float) -> Replica:
    state = ServingState(registry, EncoderCatalog(tmp_path / "encoders"), device="cpu")
    return Replica(registry, state, replica_id="me", address="me:1", live_within_s=10.0, forget_after_s=forget_after_s)


def test_a_heartbeat_forgets_replicas_silent_for_longer_than_the_window(tmp_path: Path) -> None:
    with open_registry(tmp_path / "registry.db") as registry:
        registry.heartbeat("killed", address="k:1", served={})
        time.sleep(0.3)
        registry.heartbeat("alive", address="a:1", served={})
        assert _replica(tmp_path, registry, forget_after_s=0.2).heartbeat()
        assert [r.replica_id for r in registry.list_replicas()] == ["alive", "me"]


def test_with_no_window_nobody_is_forgotten(tmp_path: Path) -> None:
    with open_registry(tmp_path / "registry.db") as registry:
        registry.heartbeat("killed", address="k:1", served={})
        time.sleep(0.05)
        assert _replica(tmp_path, registry, forget_after_s=0.0).heartbeat()
        assert [r.replica_id for r in registry.list_replicas()] == ["killed", "me"]


def test_a_negative_window_is_refused_and_the_default_is_an_hour() -> None:
    assert Settings().replica_forget_after_seconds == 3600.0
    with pytest.raises(InvalidArgument, match="replica_forget_after_seconds"):
        Settings(replica_forget_after_seconds=-1).validate()
