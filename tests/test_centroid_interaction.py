"""Centroid interaction (candidate ranking) over each document's distinct centroid codes: the
same scores as over every token's code, exactly, for about half the work on real text."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colgrid_server.search._candidates import CandidateGenerator, distinct_codes_per_document
from colgrid_server.search._maxsim import centroid_maxsim_scores
from tests.searcher_checks import synthetic_version


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_each_document_keeps_its_distinct_codes_in_ascending_order(dtype):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 0, 1, 40, 7, 0, 100])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(0, 12, size=int(offsets[-1])).astype(dtype)
    distinct, distinct_offsets = distinct_codes_per_document(codes, offsets)
    assert distinct.dtype == codes.dtype and distinct_offsets.shape == offsets.shape
    for d in range(len(lengths)):
        got = distinct[distinct_offsets[d]:distinct_offsets[d + 1]]
        np.testing.assert_array_equal(got, np.unique(codes[offsets[d]:offsets[d + 1]]))
    assert distinct.shape[0] < codes.shape[0]  # 100 tokens over 12 centroids repeat some


def test_no_tokens_at_all():
    codes, offsets = distinct_codes_per_document(np.zeros(0, np.uint16), np.zeros(3, np.int64))
    assert codes.shape == (0,) and offsets.tolist() == [0, 0, 0]


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    return synthetic_version(tmp_path_factory, "centroid-interaction", seed=5, documents=300, max_tokens=80)


def test_candidate_scores_equal_those_over_every_token_code(version):
    loaded, corpus = version
    generator = CandidateGenerator(loaded, fused=False)
    assert generator.codes.shape[0] < loaded.token_codes.shape[0]
    query = corpus.vectors(9)
    docs = generator.probe(query, nprobe=8)
    table = torch.mm(generator._centroids, torch.from_numpy(query).to(generator._centroids.dtype).T).float()
    every_token = centroid_maxsim_scores(table, loaded.token_codes, loaded.doc_offsets, docs)
    torch.testing.assert_close(generator.centroid_scores(query, docs), every_token, rtol=0, atol=0)
