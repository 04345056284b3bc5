"""The padded GPU layout (`PaddedDocuments`, the default on CUDA; the same code runs here on CPU):
per-document maxima equal the float64 reference, in any candidate order, exhaustive or not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colgrid_server.search import Searcher
from colgrid_server.search._padded import LONG_FROM, PaddedDocuments, _split_query, padded_length
from tests.searcher_checks import assert_answers_as, synthetic_version

DIM = 16


def _corpus(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    docs = [rng.standard_normal((n, DIM)).astype(np.float16) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return torch.from_numpy(np.concatenate(docs)), offsets, [d.astype(np.float64) for d in docs]


def _reference(query: np.ndarray, docs: list[np.ndarray], which: np.ndarray) -> np.ndarray:
    q = query.astype(np.float64)
    return np.stack([(q @ docs[d].T).max(axis=1) for d in which])


LENGTHS = [1, 2, 31, 32, 33, 100, 511, 512, 513, 700, 1, 64, 90, 90, 1200]


@pytest.mark.parametrize("order", ["all-in-order", "subset-shuffled", "one"])
def test_maxima_equal_the_float64_reference(order):
    tokens, offsets, docs = _corpus(LENGTHS)
    layout = PaddedDocuments(tokens, offsets)
    rng = np.random.default_rng(3)
    which = {"all-in-order": np.arange(len(LENGTHS)), "subset-shuffled": rng.permutation(len(LENGTHS))[:9],
             "one": np.array([13])}[order]  # fmt: skip
    query = rng.standard_normal((7, DIM)).astype(np.float32)
    got = layout.maxima(torch.from_numpy(query), which).numpy()
    np.testing.assert_allclose(got, _reference(query, docs, which), rtol=1e-5, atol=1e-5)


def test_documents_are_padded_with_their_last_token_into_few_buckets():
    tokens, offsets, docs = _corpus(LENGTHS)
    layout = PaddedDocuments(tokens, offsets)
    assert sorted(set(layout.bucket_lengths.tolist())) == sorted({padded_length(n) for n in LENGTHS})
    assert padded_length(33) == 64 and padded_length(LONG_FROM + 1) == LONG_FROM + 128
    b, pos = layout.bucket_of[5], layout.position[5]  # the 100-token document, padded to 128
    slab = layout.buckets[b][pos].numpy().astype(np.float64)
    np.testing.assert_array_equal(slab[:100], docs[5])
    assert (slab[100:] == docs[5][-1]).all()
    assert layout.nbytes == 2 * DIM * sum(padded_length(n) for n in LENGTHS)


def test_no_candidates_give_no_maxima_and_bad_input_is_refused():
    tokens, offsets, _ = _corpus([3, 4])
    layout = PaddedDocuments(tokens, offsets)
    assert layout.maxima(torch.ones((2, DIM)), np.array([], dtype=np.int64)).shape == (0, 2)
    with pytest.raises(ValueError, match="dim"):
        layout.maxima(torch.ones((2, DIM + 1)), np.array([0]))
    with pytest.raises(ValueError, match="at least one token"):
        PaddedDocuments(tokens, np.array([0, 3, 3, 7]))


def test_a_float32_query_split_into_two_float16_parts_keeps_float32_accuracy():
    rng = np.random.default_rng(1)
    q_t = torch.from_numpy(rng.standard_normal((DIM, 5)).astype(np.float32))
    tokens = torch.from_numpy(rng.standard_normal((50, DIM)).astype(np.float16)).to(torch.float64)
    both = _split_query(q_t, torch.float16).to(torch.float64)
    assert both.shape == (DIM, 10)
    split = tokens @ both[:, :5] + tokens @ both[:, 5:]
    exact = tokens @ q_t.to(torch.float64)
    assert float((split - exact).abs().max()) < 1e-5 * float(exact.abs().max())
    rounded = tokens @ q_t.to(torch.float16).to(torch.float64)  # what one float16 query would give
    assert float((rounded - exact).abs().max()) > 10 * float((split - exact).abs().max())


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    return synthetic_version(tmp_path_factory, "padded")


def test_a_searcher_on_the_padded_layout_answers_as_the_segment_kernel(version):
    loaded, corpus = version
    padded, plain = Searcher(loaded, padded=True), Searcher(loaded, padded=False, fast_pass=False)
    assert padded.padded is not None and plain.padded is None and Searcher(loaded).padded is None  # CPU default
    assert_answers_as(padded, plain, corpus)


def test_closing_a_searcher_frees_its_padded_copy(version):
    loaded, _ = version
    searcher = Searcher(loaded, padded=True)
    assert searcher.padded is not None and searcher.padded.nbytes > 0
    searcher.close()
    assert searcher.padded.nbytes == 0
    Searcher(loaded).close()  # nothing to free without a padded copy
