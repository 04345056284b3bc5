"""Routing on a live server: canary share by percent, sticky routing keys, single-version
answers, and versions with different encoders serving side by side during a canary."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from colgrid_client import Client
from colgrid_registry import open_registry
from colgrid_server.builder import build_index
from colgrid_server.paths import DataDir
from colgrid_server.serving import BUCKETS, bucket_of
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    INDEX, QUERIES, rollout_documents, serving, three_versions, tiny_checkpoint, tiny_encoder_dir,
    version_template)

QUERY = "parse a JSON document"


def versions_for(client: Client, keys: list[str], *, threads: int = 4) -> dict[str, str]:
    """{routing key: version that answered it}, one cheap k=1 search per key."""
    def ask(key: str) -> tuple[str, str]:
        return key, client.search(INDEX, QUERY, k=1, routing_key=key).version

    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(ask, keys))


def test_observed_canary_share_is_within_binomial_tolerance_of_the_percent(three_versions):
    with serving(three_versions) as s:
        s.client.start_canary(INDEX, "v2", 30)
        n = 2400
        answered = versions_for(s.client, [f"user-{i}" for i in range(n)])
    canary = sum(1 for v in answered.values() if v == "v2")
    assert set(answered.values()) == {"v1", "v2"}
    sigma = math.sqrt(n * 0.3 * 0.7)
    assert abs(canary - 0.3 * n) < 4.5 * sigma, (canary, n)


def test_requests_without_a_routing_key_are_split_by_the_percent_too(three_versions):
    with serving(three_versions) as s:
        s.client.start_canary(INDEX, "v2", 50)
        n = 600
        with ThreadPoolExecutor(4) as pool:
            versions = list(pool.map(lambda _: s.client.search(INDEX, QUERY, k=1).version, range(n)))
    assert abs(versions.count("v2") - n / 2) < 4.5 * math.sqrt(n * 0.25)


def test_a_routing_key_sees_the_same_version_while_the_percent_is_unchanged(three_versions):
    keys = [f"session-{i}" for i in range(150)]
    with serving(three_versions) as s:
        s.client.start_canary(INDEX, "v2", 40)
        first = versions_for(s.client, keys)
        again = versions_for(s.client, keys)
        streamed = {k: next(iter(s.client.search_stream(INDEX, [QUERY], k=1, routing_key=k))).version
                    for k in keys[:30]}
    assert first == again
    assert streamed == {k: first[k] for k in keys[:30]}
    assert {"v1", "v2"} == set(first.values())


def test_raising_the_percent_never_moves_a_key_back_to_stable(three_versions):
    keys = [f"k{i}" for i in range(300)]
    with serving(three_versions) as s:
        s.client.start_canary(INDEX, "v2", 10)
        shares = [versions_for(s.client, keys)]
        for percent in (25, 60, 100):
            s.client.set_canary_percent(INDEX, percent)
            shares.append(versions_for(s.client, keys))
    for before, after in zip(shares, shares[1:]):
        assert all(after[k] == "v2" for k in keys if before[k] == "v2")
    canary_counts = [sum(v == "v2" for v in share.values()) for share in shares]
    assert canary_counts == sorted(canary_counts) and canary_counts[-1] == len(keys)


def test_buckets_are_stable_per_index_and_key_and_uniform_enough():
    assert bucket_of("docs", "alice") == bucket_of("docs", "alice")
    keys = [f"user-{i}" for i in range(200)]
    # The index is part of the hash: one key's canary membership differs between indexes.
    assert sum(bucket_of("docs", k) == bucket_of("other", k) for k in keys) <= 1
    counts = [0] * 10
    for i in range(20_000):
        counts[bucket_of("docs", f"key-{i}") * 10 // BUCKETS] += 1
    assert max(counts) - min(counts) < 400  # each decile 2,000 ± a few sigma


def test_every_answer_names_the_version_role_and_generation_that_produced_it(three_versions,
                                                                           rollout_documents):
    held = {"v1": {d.id for d in rollout_documents[0:40]}, "v2": {d.id for d in rollout_documents[40:80]}}
    with serving(three_versions) as s:
        status = s.client.start_canary(INDEX, "v2", 50)
        roles = set()
        for i in range(40):
            result = s.client.search(INDEX, QUERIES[i % len(QUERIES)], k=5, routing_key=f"r{i}")
            assert result.generation == status.rollout.generation
            assert (result.version, result.role) in {("v1", "stable"), ("v2", "canary")}
            assert all(h.version == result.version for h in result.hits)
            assert {h.doc_id for h in result.hits} <= held[result.version]
            roles.add(result.role)
    assert roles == {"stable", "canary"}


@pytest.mark.parametrize("canary_encoder", ["tiny-bert", "tiny-colqwen2"])
def test_a_canary_built_with_another_encoder_answers_with_its_own_encoder(
        tmp_path: Path, encoder_dir: Path, request: pytest.FixtureRequest, canary_encoder: str, rollout_documents):
    """MiniLM (dim 384) stable; a canary built with another encoder (a tiny BERT text encoder,
    or a tiny ColQwen2: ColBERT-style text to a multimodal model): each query is encoded by the
    encoder of the version that answers it, and each answer equals that version's answer alone."""
    other_encoder_dir = request.getfixturevalue(
        "tiny_encoder_dir" if canary_encoder == "tiny-bert" else "colqwen2_encoder_dir")
    data = DataDir(tmp_path)
    data.encoders.mkdir(parents=True)
    (data.encoders / encoder_dir.name).symlink_to(encoder_dir, target_is_directory=True)
    docs = rollout_documents[:60]
    with open_registry(data.registry_file) as registry:
        build_index(data, registry, INDEX, docs, progress=False)
        build_index(data, registry, INDEX, docs, encoder_dir=other_encoder_dir, activate=False, progress=False)
    with serving(tmp_path) as s:
        s.client.start_canary(INDEX, "v2", 50)
        status = s.client.get_rollout(INDEX)
        assert {v.version: v.roles for v in status.versions} == {"v1": ("stable",), "v2": ("canary",)}
        routes = s.state.snapshot()[INDEX]
        by_version = {"v1": routes.stable, "v2": routes.canary}
        assert by_version["v1"].encoder.dim == 384 and by_version["v2"].encoder.dim != 384
        assert by_version["v2"].encoder.kind == ("colbert" if canary_encoder == "tiny-bert" else "colqwen2")
        seen = set()
        for i, query in enumerate(QUERIES * 3):
            result = s.client.search(INDEX, query, k=5, routing_key=f"u{i}")
            served = by_version[result.version]
            seen.add(result.version)
            assert result.encoder_id == served.encoder_id
            own = s.client.search(INDEX, query_vectors=served.encoder.encode_queries([query])[0].vectors, k=5,
                                  routing_key=f"u{i}")
            assert [h.doc_id for h in result.hits] == [h.doc_id for h in own.hits]
            assert [h.score for h in result.hits] == pytest.approx([h.score for h in own.hits], abs=1e-5)
        assert seen == {"v1", "v2"}
