"""Recall measured in production: with COLGRID_RECALL_SAMPLE_RATE, a share of answered searches
is run again exhaustively on the same version in the background, and the mean recall@k of the
answers that went out is exported per version (colgrid_sampled_recall). Checked against the
recall the test computes itself from the same searches run exhaustively through the API."""
from __future__ import annotations

from pathlib import Path

import pytest

from colgrid_client import Client
from tests.conftest import start_live_server, stop_live_server
from tests.test_metrics import Scrape, free_port, settled

QUERIES = ("open a file", "parse json", "sort a list", "compress data", "read a csv file", "join paths",
           "format a date", "spawn a process")


@pytest.fixture(scope="module")
def sampling(served_data_dir: Path):
    port = free_port()
    server, thread = start_live_server(served_data_dir, metrics_port=port, metrics_host="127.0.0.1",
                                       recall_sample_rate=1.0)
    server.metrics_port = port
    yield server
    stop_live_server(server, thread)


def test_every_sampled_search_is_rerun_exhaustively_and_its_recall_exported(sampling):
    state = sampling.running.state
    with Client(sampling.target, timeout=60, retries=0) as client:
        overlaps, version = [], ""
        for query in QUERIES:
            # Few candidates, so that the approximate answer can miss some of the exhaustive top 10.
            answer = client.search("docs", query, k=10, nprobe=1, n_candidates=10)
            assert state.recall.drain(60)
            exact = client.search("docs", query, k=10, exhaustive=True)  # never sampled itself
            overlaps.append(len({h.doc_id for h in answer.hits} & {h.doc_id for h in exact.hits}) / 10)
            version = answer.version
    labels = dict(index="docs", version=version)
    counted = settled(sampling.metrics_port, "colgrid_recall_samples_total", len(QUERIES), **labels)
    assert counted == len(QUERIES)
    assert Scrape(sampling.metrics_port).value("colgrid_sampled_recall", **labels) == pytest.approx(
        sum(overlaps) / len(overlaps), abs=1e-9)
    assert min(overlaps) < 1.0  # the measurement can tell a miss (else this test proves little)
    assert Scrape(sampling.metrics_port).value("colgrid_recall_samples_dropped_total", **labels) == 0


def test_a_stream_is_sampled_too(sampling):
    state = sampling.running.state
    before = sum(s.compared for s in state.recall.stats("docs"))
    with Client(sampling.target, timeout=60, retries=0) as client:
        assert len(list(client.search_stream("docs", ["open a file", "parse json"], k=5))) == 2
    assert state.recall.drain(60)
    assert sum(s.compared for s in state.recall.stats("docs")) == before + 2


def test_sampling_is_off_by_default(live_server, client):
    client.search("docs", "open a file", k=3)
    assert live_server.running.state.recall.stats() == []


def test_a_sample_rate_outside_zero_to_one_is_refused_naming_the_setting(tmp_path):
    from colgrid_server.config import Settings
    from colgrid_server.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        Settings.load({"data_dir": tmp_path, "recall_sample_rate": 1.5}, environ={})
    assert info.value.field == "recall_sample_rate"
