"""Searcher over a real (synthetic-vector) version: approximate vs exhaustive recall, exact
scores against a float64 reference, explanations, validation, concurrency."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from colgrid_server.errors import FailedPrecondition, InvalidArgument
from colgrid_server.index import open_version
from colgrid_server.index.testing import SyntheticCorpus, reference_maxsim, write_synthetic_version
from colgrid_server.search import SearchParams, Searcher

DIM = 32
N_DOCS = 3000


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(DIM, topics=60, seed=21)


@pytest.fixture(scope="module")
def documents(corpus):
    return corpus.documents(N_DOCS, max_tokens=60)


@pytest.fixture(scope="module")
def version(tmp_path_factory, corpus, documents):
    path = tmp_path_factory.mktemp("search") / "v1"
    write_synthetic_version(path, documents, corpus.encoder)
    loaded = open_version(path, device="cpu")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def queries(corpus):
    return [corpus.vectors(int(n)) for n in np.random.default_rng(3).integers(4, 33, size=40)]


def _tokens(query: np.ndarray) -> list[str]:
    return [f"q{i}" for i in range(query.shape[0])]


def _stored(documents):
    return [d.vectors.astype(np.float16) for d in documents]


def test_approximate_recall_at_10_is_at_least_095_at_defaults(version, queries):
    searcher = Searcher(version)
    recalls = []
    for q in queries:
        approx = {h.doc_id for h in searcher.search(q, _tokens(q), SearchParams()).hits}
        exact = {h.doc_id for h in searcher.exhaustive(q, _tokens(q), SearchParams()).hits}
        recalls.append(len(approx & exact) / 10)
    assert np.mean(recalls) >= 0.95, f"recall@10 = {np.mean(recalls):.3f}"


def test_exhaustive_top_k_matches_the_float64_reference(version, documents, queries):
    stored = _stored(documents)
    for q in queries[:10]:
        reference = reference_maxsim(q, stored)
        expected = np.lexsort((np.arange(N_DOCS), -reference))[:10]
        hits = Searcher(version).exhaustive(q, _tokens(q), SearchParams()).hits
        assert [h.doc_id for h in hits] == [documents[i].id for i in expected]
        np.testing.assert_allclose([h.score for h in hits], reference[expected], atol=1e-5)


def test_returned_scores_are_exact_for_the_stored_vectors(version, documents, queries):
    stored = _stored(documents)
    by_id = {d.id: i for i, d in enumerate(documents)}
    for q in queries[:10]:
        hits = Searcher(version).search(q, _tokens(q), SearchParams(k=20, n_candidates=300)).hits
        reference = reference_maxsim(q, [stored[by_id[h.doc_id]] for h in hits])
        np.testing.assert_allclose([h.score for h in hits], reference, atol=1e-5)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_bf16_fast_pass_returns_the_same_hits_as_one_float32_pass(version, queries):
    fast, plain = Searcher(version, fast_pass=True), Searcher(version, fast_pass=False)
    params = SearchParams(k=10, n_candidates=2000)
    for q in queries:
        a = fast.search(q, _tokens(q), params).hits
        b = plain.search(q, _tokens(q), params).hits
        assert [h.doc_id for h in a] == [h.doc_id for h in b]
        # float32 sums may differ in the last bit with the matmul's shape, never more
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)


def test_hits_are_ranked_from_one_and_carry_metadata(version, queries):
    q = queries[0]
    result = Searcher(version).search(q, _tokens(q), SearchParams(k=5))
    assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
    first = result.hits[0]
    assert first.metadata == {"n": int(first.doc_id.split("-")[1]), "title": f"Doc {first.doc_id.split('-')[1]}"}
    assert first.explanation == ()


def test_stats_count_candidates_and_query_tokens(version, queries):
    q = queries[1]
    stats = Searcher(version).search(q, _tokens(q), SearchParams(n_candidates=100)).stats
    assert 10 <= stats.candidates <= 100
    assert stats.query_tokens == q.shape[0]
    assert stats.candidates_ms >= 0 and stats.maxsim_ms >= 0
    assert Searcher(version).exhaustive(q, _tokens(q), SearchParams()).stats.candidates == N_DOCS


def test_explanations_sum_to_the_score_and_point_into_the_text(version, documents, queries):
    q = queries[2]
    by_id = {d.id: d for d in documents}
    hits = Searcher(version).search(q, _tokens(q), SearchParams(k=5, explain=True)).hits
    for hit in hits:
        doc = by_id[hit.doc_id]
        assert [m.query_index for m in hit.explanation] == list(range(q.shape[0]))
        assert [m.query_token for m in hit.explanation] == _tokens(q)
        assert sum(m.similarity for m in hit.explanation) == pytest.approx(hit.score, abs=1e-5)
        assert sum(m.share for m in hit.explanation) == pytest.approx(1.0, abs=1e-5)
        for m in hit.explanation:
            assert (m.start, m.end) == tuple(doc.spans[m.doc_token_index])
            assert m.doc_token == doc.text[m.start : m.end] == f"w{m.doc_token_index}"
            best = (q[m.query_index].astype(np.float64) @ doc.vectors.astype(np.float16).astype(np.float64).T).max()
            assert m.similarity == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize(
    ("vectors", "tokens", "field"),
    [
        (np.ones((3, DIM + 1), np.float32), ["a", "b", "c"], "query_vectors"),
        (np.ones((0, DIM), np.float32), [], "query_vectors"),
        (np.full((2, DIM), np.nan, np.float32), ["a", "b"], "query_vectors"),
        (np.ones((2, DIM), np.float32), ["a"], "query_tokens"),
    ],
)
def test_bad_query_is_rejected_naming_the_field(version, vectors, tokens, field):
    with pytest.raises(InvalidArgument) as info:
        Searcher(version).search(vectors, tokens, SearchParams())
    assert info.value.field == field


def test_concurrent_searches_return_what_each_returns_alone(version, queries):
    searcher = Searcher(version)
    params = SearchParams(explain=True)
    alone = [searcher.search(q, _tokens(q), params).hits for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda q: searcher.search(q, _tokens(q), params).hits, queries * 2))
    assert together == alone * 2


def test_a_closed_version_refuses_searches(tmp_path, corpus):
    path = tmp_path / "v"
    write_synthetic_version(path, corpus.documents(20), corpus.encoder, build_params={"n_centroids": 4})
    loaded = open_version(path)
    searcher = Searcher(loaded)
    loaded.close()
    q = corpus.vectors(3)
    with pytest.raises(FailedPrecondition, match="unloaded"):
        searcher.search(q, _tokens(q), SearchParams())


def test_real_encoder_version_finds_a_document_by_its_own_words(tmp_path, text_encoder):
    from colgrid_server.corpus import iter_docstring_documents
    from colgrid_server.index import build_version

    docs = list(iter_docstring_documents(limit=40))
    summary = build_version(docs, text_encoder, tmp_path / "v", batch_size=16)
    loaded = open_version(summary.path)
    assert loaded.encoder.id == text_encoder.id and loaded.encoder.dim == text_encoder.dim
    target = docs[17]
    query = text_encoder.encode_queries([target.text[:120]])[0]
    hits = Searcher(loaded).search(query.vectors, query.tokens, SearchParams(k=3, explain=True)).hits
    assert hits[0].doc_id == target.id
    for match in hits[0].explanation:
        assert match.doc_token == (target.text[match.start : match.end] if match.start >= 0 else "")
    assert sum(m.similarity for m in hits[0].explanation) == pytest.approx(hits[0].score, abs=1e-4)


def test_search_leaves_the_callers_torch_thread_setting_unchanged(version, queries):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q = queries[0]
        Searcher(version).search(q, _tokens(q), SearchParams())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
