"""Shared by the tests of the exact-MaxSim layouts: a small synthetic version, and the check that
one searcher answers as another (same hits, scores and token-level explanations)."""
from __future__ import annotations

import numpy as np

from colgrid_server.index import LoadedVersion, open_version
from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version
from colgrid_server.search import SearchParams, Searcher


def synthetic_version(tmp_path_factory, name: str, *, seed: int = 2, documents: int = 300,
                      max_tokens: int = 80) -> tuple[LoadedVersion, SyntheticCorpus]:  # fmt: skip
    corpus = SyntheticCorpus(24, topics=20, noise=0.25, seed=seed)
    path = tmp_path_factory.mktemp(name) / "v"
    write_synthetic_version(path, corpus.documents(documents, max_tokens=max_tokens), corpus.encoder)
    return open_version(path), corpus


def assert_answers_as(got: Searcher, want: Searcher, corpus: SyntheticCorpus) -> None:
    """Approximate and exhaustive searches of 3-, 17- and 32-token queries, with explanations."""
    for n in (3, 17, 32):
        q = corpus.vectors(n)
        tokens = [f"t{i}" for i in range(n)]
        for run in ("search", "exhaustive"):
            a = getattr(got, run)(q, tokens, SearchParams(k=10, explain=True))
            b = getattr(want, run)(q, tokens, SearchParams(k=10, explain=True))
            assert [h.doc_id for h in a.hits] == [h.doc_id for h in b.hits]
            np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], rtol=1e-5)
            assert [[m.doc_token_index for m in h.explanation] for h in a.hits] == [
                [m.doc_token_index for m in h.explanation] for h in b.hits
            ]
