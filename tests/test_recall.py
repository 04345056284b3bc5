"""Approximate search (centroid HNSW + inverted lists + exact MaxSim) against exhaustive exact
MaxSim on the same embeddings: recall@10 at the default settings on ≥ 5k real documents."""
from __future__ import annotations

import numpy as np
import pytest

from colgrid_server.builder import build_index
from colgrid_server.index import open_version
from colgrid_server.paths import DataDir
from colgrid_server.search import SearchParams, Searcher
from colgrid_registry import open_registry
from tests.conftest import link_encoders


@pytest.fixture(scope="module")
def big_version(tmp_path_factory, shared_data_dir, encoder_dir, stdlib_documents):
    assert len(stdlib_documents) >= 5100, "the stdlib corpus should hold at least 5,100 docstrings"
    data_dir = tmp_path_factory.mktemp("recall")
    link_encoders(data_dir, shared_data_dir)
    with open_registry(DataDir(data_dir).registry_file) as registry:
        outcome = build_index(DataDir(data_dir), registry, "stdlib", stdlib_documents[:5000], progress=False)
    version = open_version(outcome.summary.path)
    yield version
    version.close()


def test_default_search_recall_at_10_is_at_least_095(big_version, text_encoder, stdlib_documents):
    searcher = Searcher(big_version)
    held_out = stdlib_documents[5000:5100]  # queries: real text that is not in the index
    queries = text_encoder.encode_queries([d.text[:160] for d in held_out])
    params = SearchParams()
    recalls = []
    for q in queries:
        approx = {h.doc_id for h in searcher.search(q.vectors, q.tokens, params).hits}
        exact = {h.doc_id for h in searcher.exhaustive(q.vectors, q.tokens, params).hits}
        recalls.append(len(approx & exact) / len(exact))
    assert big_version.documents == 5000
    assert float(np.mean(recalls)) >= 0.95, f"recall@10 {np.mean(recalls):.3f}"
