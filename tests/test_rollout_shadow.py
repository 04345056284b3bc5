"""Shadow traffic: mirrored after answering, never returned, never an error, compared and
counted per version pair, and shed first when its queue is full."""
from __future__ import annotations

import math

import pytest

from colgrid_registry import open_registry
from colgrid_server.catalog import EncoderCatalog
from colgrid_server.paths import DataDir
from colgrid_server.search import SearchParams
from colgrid_server.serving import Query, ShadowRunner, load_version, overlap_at_k, rank_biased_overlap
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    INDEX, QUERIES, build_versions, narrow_encoder_dir, rollout_documents, serving, three_versions,
    tiny_checkpoint, tiny_encoder_dir, version_template)

REQUESTS = [(QUERIES[i % len(QUERIES)], f"user-{i}") for i in range(32)]


def answers(client, *, stream: bool = False) -> list[tuple[str, list[str], list[float]]]:
    if stream:
        results = list(client.search_stream(INDEX, [q for q, _ in REQUESTS], k=5, exhaustive=True))
    else:
        results = [client.search(INDEX, q, k=5, routing_key=key, exhaustive=True) for q, key in REQUESTS]
    return [(r.version, [h.doc_id for h in r.hits], [h.score for h in r.hits]) for r in results]


def only(stats, primary: str, shadow: str):
    (found,) = [s for s in stats if (s.primary, s.shadow) == (primary, shadow)]
    return found


def test_shadow_never_changes_a_response_and_records_overlap_per_version_pair(
        three_versions, tiny_encoder_dir, rollout_documents):
    (twin,) = build_versions(three_versions, tiny_encoder_dir, rollout_documents, 1)  # v1's documents again
    with serving(three_versions) as s:
        baseline = answers(s.client)
        s.client.set_shadow(INDEX, twin)
        assert answers(s.client) == baseline
        assert answers(s.client, stream=True) == baseline
        s.client.set_shadow(INDEX, "v2")  # other documents: no overlap at all
        assert answers(s.client) == baseline
        assert s.state.shadow.drain()
        stats = s.client.get_rollout(INDEX).shadow_stats
    same, other = only(stats, "v1", twin), only(stats, "v1", "v2")
    assert (same.sampled, same.compared, same.errors, same.dropped) == (64, 64, 0, 0)
    assert same.mean_overlap == 1.0 and same.mean_rank_correlation == pytest.approx(1.0)
    assert (other.compared, other.mean_overlap, other.mean_rank_correlation) == (32, 0.0, 0.0)
    assert same.shadow_p50_ms > 0 and same.primary_p95_ms >= same.primary_p50_ms > 0


def test_a_failing_shadow_never_surfaces_an_error(three_versions, narrow_encoder_dir, rollout_documents):
    """Query vectors computed for the stable encoder (dim 32) cannot run on a shadow built with
    a 16-dim encoder: every shadow search fails, and no caller sees it."""
    (narrow,) = build_versions(three_versions, narrow_encoder_dir, rollout_documents, 1, first=3)
    with serving(three_versions) as s:
        encoder = s.state.snapshot()[INDEX].stable.encoder
        vectors = {q: encoder.encode_queries([q])[0].vectors for q in QUERIES}

        def by_vectors() -> list:
            results = [s.client.search(INDEX, query_vectors=vectors[q], k=5, routing_key=key) for q, key in REQUESTS]
            return [(r.version, [h.doc_id for h in r.hits], [h.score for h in r.hits]) for r in results]

        baseline = by_vectors()
        s.client.set_shadow(INDEX, narrow)
        assert by_vectors() == baseline
        assert s.state.shadow.drain()
        status = s.client.get_rollout(INDEX)
    failed = only(status.shadow_stats, "v1", narrow)
    assert (failed.sampled, failed.errors, failed.compared) == (32, 32, 0)
    assert "dim" in failed.last_error or "shape" in failed.last_error
    assert status.rollout.shadow == narrow and status.load_errors == ()


def test_shadow_percent_mirrors_that_share_of_requests(three_versions):
    n = 400
    with serving(three_versions) as s:
        s.client.set_shadow(INDEX, "v2", 25)
        for i in range(n):
            s.client.search(INDEX, QUERIES[i % len(QUERIES)], k=1)
        assert s.state.shadow.drain()
        sampled = only(s.client.get_rollout(INDEX).shadow_stats, "v1", "v2").sampled
        cleared = s.client.clear_shadow(INDEX)
    assert abs(sampled - n / 4) < 4.5 * math.sqrt(n * 0.25 * 0.75)
    assert cleared.rollout.shadow is None and cleared.rollout.shadow_percent == 0


def test_shadow_work_is_shed_when_its_queue_is_full_and_every_lease_comes_back(three_versions):
    data = DataDir(three_versions)
    catalog = EncoderCatalog(data.encoders)
    with open_registry(data.registry_file) as registry:
        primary = load_version(registry.get_version(INDEX, "v1"), catalog)
        shadow = load_version(registry.get_version(INDEX, "v2"), catalog)
    query = Query(params=SearchParams(k=5), text=QUERIES[0])
    answer = primary.search(query)
    runner = ShadowRunner(workers=1, capacity=2)
    try:
        accepted = [runner.submit(shadow.acquire(), query, "v1", answer) for _ in range(200)]
        assert runner.drain()
        (stats,) = runner.stats(INDEX)
    finally:
        runner.close()
    assert 0 < sum(accepted) < 200
    assert stats.sampled == 200 == stats.compared + stats.errors + stats.dropped
    assert stats.dropped == accepted.count(False) and stats.errors == 0
    assert shadow.in_flight == 0


def test_overlap_at_k_counts_shared_documents_in_the_top_k():
    assert overlap_at_k(list("abcde"), list("edcba"), 5) == 1.0
    assert overlap_at_k(list("abcde"), list("abxyz"), 5) == 0.4
    assert overlap_at_k(list("abcde"), list("vwxyz"), 5) == 0.0
    assert overlap_at_k(list("ab"), list("ba"), 10) == 1.0  # fewer documents than k
    assert overlap_at_k([], [], 10) == 1.0


def test_rank_biased_overlap_is_one_for_equal_rankings_and_weighs_the_top_most():
    ranking = [f"d{i}" for i in range(10)]
    assert rank_biased_overlap(ranking, ranking) == pytest.approx(1.0)
    assert rank_biased_overlap(ranking, [f"x{i}" for i in range(10)]) == 0.0
    top_swapped = ranking[1::-1] + ranking[2:]
    bottom_swapped = ranking[:8] + ranking[:7:-1]
    assert rank_biased_overlap(ranking, top_swapped) < rank_biased_overlap(ranking, bottom_swapped) < 1.0
    assert rank_biased_overlap(ranking, list(reversed(ranking))) < rank_biased_overlap(ranking, top_swapped)
