"""Rollout changes through the RolloutService on a live server: each answers with the state
after it, refuses unsafe targets, keeps in-flight work on its version, and reports replicas."""
from __future__ import annotations

import asyncio
import queue
import shutil
import time
from pathlib import Path

import pytest

from colgrid_client import AbortedError, AsyncClient, FailedPreconditionError, InvalidArgumentError
from colgrid_registry import open_registry
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.paths import DataDir
from colgrid_server.serving import load_version
from tests.test_e2e_versions import flip_one_byte
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    INDEX, QUERIES, build_versions, other_tiny_encoder_dir, rollout_documents, serving, three_versions,
    tiny_checkpoint, tiny_encoder_dir, version_template)


def answering_versions(client, n: int = 24) -> set[str]:
    return {client.search(INDEX, QUERIES[i % len(QUERIES)], k=3, routing_key=f"key-{i}").version
            for i in range(n)}


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_promote_rollback_abort_and_set_stable_answer_with_the_rollout_after_them(three_versions):
    with serving(three_versions) as s:
        started = s.client.start_canary(INDEX, "v2", 50, actor="alice", reason="fresher corpus")
        assert (started.rollout.stable, started.rollout.canary, started.rollout.canary_percent) == ("v1", "v2", 50)
        assert answering_versions(s.client) == {"v1", "v2"}

        promoted = s.client.promote(INDEX, actor="alice")
        r = promoted.rollout
        assert (r.stable, r.canary, r.previous_stable) == ("v2", None, "v1")
        assert answering_versions(s.client) == {"v2"}

        rolled_back = s.client.rollback(INDEX, actor="bob", reason="worse answers")
        assert (rolled_back.rollout.stable, rolled_back.rollout.previous_stable) == ("v1", "v2")
        assert answering_versions(s.client) == {"v1"}

        s.client.start_canary(INDEX, "v3", 10)
        aborted = s.client.abort_canary(INDEX)
        assert (aborted.rollout.stable, aborted.rollout.canary) == ("v1", None)
        assert answering_versions(s.client) == {"v1"}

        direct = s.client.set_stable(INDEX, "v3", reason="hotfix")
        assert (direct.rollout.stable, direct.rollout.previous_stable) == ("v3", "v1")
        assert answering_versions(s.client) == {"v3"}
        assert direct.served_generation == direct.rollout.generation == started.rollout.generation + 5

        history = s.client.rollout_history(INDEX, limit=10)
    assert [e.action for e in history] == ["set_stable", "abort_canary", "start_canary", "rollback", "promote",
                                          "start_canary", "set_stable"]
    first_change = history[-2]
    assert (first_change.actor, first_change.reason) == ("alice", "fresher corpus")
    assert (first_change.before.canary, first_change.after.canary) == (None, "v2")
    assert history[3].actor == "bob" and history[4].after.stable == "v2"


def test_every_change_is_acknowledged_by_the_server_that_made_it(three_versions):
    with serving(three_versions) as s:
        status = s.client.start_canary(INDEX, "v2", 5, wait_for_replicas=10)
    assert status.pending_replicas == () and status.acknowledged
    (me,) = [r for r in status.replicas if r.replica_id == status.replica_id]
    assert me.live and me.acknowledged and me.generation == status.rollout.generation


def test_a_canary_onto_a_version_that_is_not_ready_is_refused_naming_the_check(three_versions):
    with serving(three_versions) as s:
        building = s.registry.allocate_version(INDEX, encoder_id="0" * 64, encoder_kind="colbert", dim=32,
                                               storage_uri=None, build_params={})
        before = s.client.get_rollout(INDEX).rollout
        with pytest.raises(FailedPreconditionError) as info:
            s.client.start_canary(INDEX, building.version, 10)
        assert info.value.error_metadata["check"] == "ready"
        assert "BUILDING" in str(info.value)
        assert s.client.get_rollout(INDEX).rollout == before
        assert answering_versions(s.client) == {"v1"}


def test_a_canary_onto_a_corrupt_version_is_refused_and_stable_keeps_serving(three_versions, tiny_encoder_dir,
                                                                            rollout_documents):
    (v4,) = build_versions(three_versions, tiny_encoder_dir, rollout_documents, 1, first=3)
    with serving(three_versions) as s:
        flip_one_byte(Path(s.registry.get_version(INDEX, v4).storage_uri))
        before = s.client.get_rollout(INDEX).rollout
        for change in (lambda: s.client.start_canary(INDEX, v4, 50),
                       lambda: s.client.set_shadow(INDEX, v4),
                       lambda: s.client.set_stable(INDEX, v4)):
            with pytest.raises(FailedPreconditionError) as info:
                change()
            assert info.value.error_metadata["check"] == "checksum"
            assert v4 in str(info.value)
        assert s.client.get_rollout(INDEX).rollout == before
        assert answering_versions(s.client) == {"v1"}


def test_a_canary_whose_encoder_cannot_be_loaded_is_refused(three_versions, other_tiny_encoder_dir,
                                                           rollout_documents):
    (v4,) = build_versions(three_versions, other_tiny_encoder_dir, rollout_documents, 1, first=3)
    with open_registry(DataDir(three_versions).registry_file) as registry:
        encoder_id = registry.get_version(INDEX, v4).encoder_id
    for copy in DataDir(three_versions).encoders.glob("tiny-bert-short-*"):
        shutil.rmtree(copy)  # the version pins an encoder this server does not have
    with serving(three_versions) as s:
        with pytest.raises(FailedPreconditionError) as info:
            s.client.start_canary(INDEX, v4, 50)
        assert info.value.error_metadata["check"] == "encoder"
        assert encoder_id[:16] in str(info.value)
        assert s.client.get_rollout(INDEX).rollout.canary is None


def test_a_stale_expected_generation_is_aborted_and_changes_nothing(three_versions):
    with serving(three_versions) as s:
        current = s.client.get_rollout(INDEX).rollout
        with pytest.raises(AbortedError) as info:
            s.client.start_canary(INDEX, "v2", 10, expected_generation=current.generation - 1)
        assert str(current.generation) in str(info.value)
        assert s.client.get_rollout(INDEX).rollout == current
        ok = s.client.start_canary(INDEX, "v2", 10, expected_generation=current.generation)
        assert ok.rollout.generation == current.generation + 1


def test_a_refused_transition_is_a_failed_precondition_and_a_bad_percent_an_invalid_argument(three_versions):
    with serving(three_versions) as s:
        with pytest.raises(FailedPreconditionError, match="no canary"):
            s.client.promote(INDEX)
        with pytest.raises(InvalidArgumentError):
            s.client.start_canary(INDEX, "v2", 101)
        assert s.client.get_rollout(INDEX).rollout.generation == 1


def test_a_stream_keeps_its_version_across_changes_and_its_version_unloads_only_after_it_ends(three_versions):
    feed: queue.Queue[str | None] = queue.Queue()

    def queries():
        while (query := feed.get()) is not None:
            yield query

    def held() -> dict:
        return {v.version: (v.roles, v.draining, v.in_flight) for v in s.client.get_rollout(INDEX).versions}

    with serving(three_versions) as s:
        s.client.start_canary(INDEX, "v2", 0)
        results = s.client.search_stream(INDEX, queries(), k=3)
        feed.put(QUERIES[0])
        answered = [next(results).version]

        s.client.promote(INDEX)  # v1 stays loaded as the previous stable, for an instant rollback
        assert held()["v1"] == (("previous",), False, 1)
        feed.put(QUERIES[1])
        answered.append(next(results).version)

        s.client.set_stable(INDEX, "v3")  # now nothing names v1: it drains, then unloads
        assert held()["v1"] == ((), True, 1)
        feed.put(QUERIES[2])
        answered.append(next(results).version)
        assert answering_versions(s.client) == {"v3"}

        feed.put(None)
        assert list(results) == []
        assert wait_until(lambda: "v1" not in held())
        assert set(held()) == {"v2", "v3"}
    assert answered == ["v1", "v1", "v1"]


def test_a_rollback_flips_to_the_previous_stable_still_loaded(three_versions):
    with serving(three_versions) as s:
        s.client.start_canary(INDEX, "v2", 50)
        s.client.promote(INDEX)
        previous = s.state.snapshot()[INDEX].standby
        assert previous is not None and previous.version == "v1"
        rolled_back = s.client.rollback(INDEX)
        assert s.state.snapshot()[INDEX].stable is previous  # the same loaded object: nothing reloaded
        assert {v.version: v.roles for v in rolled_back.versions} == {"v1": ("stable",), "v2": ("previous",)}
        assert answering_versions(s.client) == {"v1"}


def test_a_retired_version_closes_only_when_its_last_lease_ends(three_versions):
    data = DataDir(three_versions)
    with open_registry(data.registry_file) as registry:
        served = load_version(registry.get_version(INDEX, "v1"), EncoderCatalog(data.encoders))
    first, second = served.acquire(), served.acquire()
    served.retire()
    first.release()
    first.release()  # releasing twice is harmless
    assert not served.closed and served.in_flight == 1
    second.release()
    assert served.closed and served.acquire() is None


def test_a_version_that_fails_to_load_leaves_the_previous_routes_serving(three_versions, tiny_encoder_dir,
                                                                        rollout_documents):
    (v4,) = build_versions(three_versions, tiny_encoder_dir, rollout_documents, 1, first=3)
    with serving(three_versions) as s:
        before = s.client.get_rollout(INDEX)
        flip_one_byte(Path(s.registry.get_version(INDEX, v4).storage_uri))
        # Another replica (without this server's checks) points the canary at it.
        s.registry.start_canary(INDEX, v4, 50, actor="elsewhere")
        assert s.server.refresh() is False
        status = s.client.get_rollout(INDEX)
        assert status.rollout.canary == v4
        assert status.served_generation == before.rollout.generation
        assert [(e.version, e.check, e.generation) for e in status.load_errors] == [
            (v4, "checksum", status.rollout.generation)]
        assert status.pending_replicas == (status.replica_id,)
        assert answering_versions(s.client) == {"v1"}


def test_a_server_starting_on_a_canary_it_cannot_load_serves_stable_alone_without_acknowledging(
        three_versions, tiny_encoder_dir, rollout_documents):
    (v4,) = build_versions(three_versions, tiny_encoder_dir, rollout_documents, 1, first=3)
    with open_registry(DataDir(three_versions).registry_file) as registry:
        registry.start_canary(INDEX, v4, 50)
        flip_one_byte(Path(registry.get_version(INDEX, v4).storage_uri))
    with serving(three_versions) as s:
        status = s.client.get_rollout(INDEX)
        assert status.served_generation is None and status.pending_replicas == (status.replica_id,)
        assert [(e.version, e.check) for e in status.load_errors] == [(v4, "checksum")]
        assert answering_versions(s.client, 40) == {"v1"}


def test_a_change_waits_until_every_live_replica_serves_it(three_versions):
    with serving(three_versions, registry_poll_seconds=0.2) as a:
        with serving(three_versions, registry_poll_seconds=0.2) as b:
            status = a.client.start_canary(INDEX, "v2", 30, wait_for_replicas=30)
            assert status.pending_replicas == ()
            live = {r.replica_id: r for r in status.replicas if r.live}
            assert set(live) == {a.server.running.replica.replica_id, b.server.running.replica.replica_id}
            assert all(r.acknowledged and r.generation == status.rollout.generation for r in live.values())
            assert answering_versions(b.client, 40) == {"v1", "v2"}
        # b stopped gracefully: it left the replica list, so the next change waits for a alone.
        after = a.client.promote(INDEX, wait_for_replicas=30)
        assert [r.replica_id for r in after.replicas] == [a.server.running.replica.replica_id]
        assert after.pending_replicas == ()


def test_a_wait_that_runs_out_returns_the_change_and_names_the_pending_replicas(three_versions):
    with serving(three_versions) as s:
        s.registry.heartbeat("stuck-replica", address="10.0.0.9:50051", served={INDEX: 1})
        started = time.monotonic()
        status = s.client.start_canary(INDEX, "v2", 20, wait_for_replicas=0.5)
        elapsed = time.monotonic() - started
        assert status.rollout.canary == "v2"
        assert status.pending_replicas == ("stuck-replica",) and not status.acknowledged
        assert 0.5 <= elapsed < 10
        stuck = next(r for r in status.replicas if r.replica_id == "stuck-replica")
        assert (stuck.generation, stuck.acknowledged) == (1, False)


def test_the_async_client_reads_and_changes_rollouts(three_versions):
    async def run(target: str):
        async with AsyncClient(target, timeout=60, retries=0) as client:
            started = await client.start_canary(INDEX, "v2", 25, actor="bot")
            promoted = await client.promote(INDEX, expected_generation=started.rollout.generation)
            status = await client.get_rollout(INDEX)
            history = await client.rollout_history(INDEX, 2)
            return promoted, status, history

    with serving(three_versions) as s:
        promoted, status, history = asyncio.run(run(s.target))
    assert promoted.rollout.stable == status.rollout.stable == "v2"
    assert [(e.action, e.actor) for e in history] == [("promote", "api"), ("start_canary", "bot")]
