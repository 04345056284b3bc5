"""A server with the int8 MaxSim screen (COLGRID_INT8_SCREEN / serve --int8-screen) answers
exactly as one without: same hits, same scores, same explanations."""
from __future__ import annotations

import pytest

from colgrid_client import Client
from tests.conftest import start_live_server, stop_live_server

QUERIES = ("parse a JSON document", "open a socket connection", "sort a list in place", "read a file line by line",
           "format a date as a string", "compress data with zlib")


@pytest.fixture(scope="module")
def pair(served_data_dir):
    plain, plain_thread = start_live_server(served_data_dir)
    screened, screened_thread = start_live_server(served_data_dir, int8_screen=True)
    yield plain, screened
    stop_live_server(screened, screened_thread)
    stop_live_server(plain, plain_thread)


def test_the_screened_server_holds_the_int8_copy(pair) -> None:
    plain, screened = pair
    served = screened.running.state.snapshot()["docs"].stable
    assert served.loaded.store.screen is not None
    assert plain.running.state.snapshot()["docs"].stable.loaded.store.screen is None


@pytest.mark.parametrize("exhaustive", [False, True])
def test_answers_equal_the_unscreened_server(pair, exhaustive: bool) -> None:
    plain, screened = pair
    with Client(plain.target, timeout=60, retries=0) as a, Client(screened.target, timeout=60, retries=0) as b:
        for query in QUERIES:
            x = a.search("docs", query, k=10, explain=True, exhaustive=exhaustive)
            y = b.search("docs", query, k=10, explain=True, exhaustive=exhaustive)
            assert [h.doc_id for h in x.hits] == [h.doc_id for h in y.hits]
            assert [h.score for h in x.hits] == pytest.approx([h.score for h in y.hits], abs=1e-5)
            assert [[m.doc_token_index for m in h.explanation] for h in x.hits] == \
                   [[m.doc_token_index for m in h.explanation] for h in y.hits]
