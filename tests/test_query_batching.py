"""Query encodes from concurrent requests are batched into shared model runs, with no added
wait, and every caller gets exactly its own query's vectors."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from colgrid_server.encoders.batching import BatchingEncoder, QueryBatcher

QUERIES = [f"how do I parse {word} in python" for word in
           ("json", "xml", "csv", "dates", "urls", "email headers", "command line flags", "toml")] * 4


def test_concurrent_queries_share_model_runs_and_get_their_own_vectors(text_encoder) -> None:
    expected = {q: text_encoder.encode_queries([q])[0] for q in set(QUERIES)}
    batching = BatchingEncoder(text_encoder)
    start = threading.Barrier(16)

    def one(query: str):
        start.wait()
        return query, batching.encode_queries([query])[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, QUERIES[:16]))
    for query, encoded in results:
        np.testing.assert_allclose(encoded.vectors, expected[query].vectors, atol=1e-5)
        assert encoded.tokens == expected[query].tokens
    assert batching.batcher.encoded == 16
    assert batching.batcher.runs < 16  # at least one run served several callers


def test_a_lone_query_runs_at_once_in_its_own_run() -> None:
    seen: list[list[str]] = []
    batcher = QueryBatcher(lambda texts: seen.append(list(texts)) or [t.upper() for t in texts])
    assert batcher.encode("a") == "A"
    assert seen == [["a"]] and batcher.runs == 1


def test_callers_arriving_during_a_run_are_served_together_by_the_next_one() -> None:
    gate = threading.Event()
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> list[str]:
        calls.append(list(texts))
        if len(calls) == 1:
            gate.wait(5)  # hold the first run while others queue up
        return [t * 2 for t in texts]

    batcher = QueryBatcher(encode, max_batch=8)
    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(batcher.encode, "a")
        while not calls:
            time.sleep(0.001)
        rest = [pool.submit(batcher.encode, t) for t in "bcdef"]
        while len(batcher._pending) < 5:
            time.sleep(0.001)
        gate.set()
        assert first.result(5) == "aa"
        assert [f.result(5) for f in rest] == ["bb", "cc", "dd", "ee", "ff"]
    assert calls[0] == ["a"] and sorted(calls[1]) == ["b", "c", "d", "e", "f"] and len(calls) == 2


def test_a_failing_query_fails_alone_and_its_companions_are_answered() -> None:
    gate = threading.Event()
    first_run = threading.Event()

    def encode(texts: list[str]) -> list[str]:
        if not first_run.is_set():
            first_run.set()
            gate.wait(5)
        if "bad" in texts:
            raise ValueError("bad query")
        return texts

    batcher = QueryBatcher(encode)
    with ThreadPoolExecutor(4) as pool:
        lead = pool.submit(batcher.encode, "x")
        first_run.wait(5)
        others = [pool.submit(batcher.encode, t) for t in ("ok1", "bad", "ok2")]
        while len(batcher._pending) < 3:
            time.sleep(0.001)
        gate.set()
        assert lead.result(5) == "x"
        assert others[0].result(5) == "ok1" and others[2].result(5) == "ok2"
        with pytest.raises(ValueError, match="bad query"):
            others[1].result(5)


def test_batching_encoder_passes_everything_else_through(text_encoder) -> None:
    batching = BatchingEncoder(text_encoder)
    assert (batching.id, batching.kind, batching.dim) == (text_encoder.id, text_encoder.kind, text_encoder.dim)
    two = batching.encode_queries(["a b", "c d"])
    assert len(two) == 2 and batching.batcher.runs == 0  # multi-query calls go straight through
