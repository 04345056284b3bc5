"""Search knobs: defaults, wire semantics (unset = default), and validation naming the field."""
from __future__ import annotations

import pytest

from colgrid_server.errors import InvalidArgument
from colgrid_server.search import CANDIDATES_PER_HIT, DEFAULT_K, DEFAULT_N_CANDIDATES, DEFAULT_NPROBE, MAX_K, SearchParams


def test_defaults():
    params = SearchParams()
    assert (params.k, params.nprobe, params.n_candidates, params.explain) == (
        DEFAULT_K, DEFAULT_NPROBE, DEFAULT_N_CANDIDATES, False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": MAX_K + 1}, "k"),
        ({"nprobe": 0}, "nprobe"),
        ({"n_candidates": 0}, "n_candidates"),
        ({"k": 50, "n_candidates": 20}, "n_candidates"),
        ({"k": 2.5}, "k"),
        ({"k": True}, "k"),
    ],
)
def test_invalid_knob_is_rejected_naming_its_field(kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        SearchParams(**kwargs)
    assert info.value.field == field


def test_unset_wire_knobs_take_the_defaults():
    assert SearchParams.from_request(None, None, None, False) == SearchParams()


def test_zero_from_the_wire_is_an_error_not_a_default():
    with pytest.raises(InvalidArgument) as info:
        SearchParams.from_request(k=0)
    assert info.value.field == "k"


def test_unset_n_candidates_grows_with_k():
    assert SearchParams(k=10).n_candidates == DEFAULT_N_CANDIDATES
    assert SearchParams(k=100).n_candidates == CANDIDATES_PER_HIT * 100
    assert SearchParams.from_request(k=MAX_K).n_candidates == CANDIDATES_PER_HIT * MAX_K


def test_explicit_knobs_are_kept():
    assert SearchParams.from_request(k=3, nprobe=2, n_candidates=40, explain=True) == SearchParams(3, 2, 40, True)
