"""JSON logs: one object per line with time, level, logger, message, request_id and caller;
request ids follow a call from the interceptor into refusal logs and worker threads."""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from colgrid_server.observability import JsonFormatter, WorkerPool, caller, configure_logging, request_id
from colgrid_server.security import create_key
from tests.conftest import start_live_server, stop_live_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def json_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go to a buffer through JsonFormatter."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("colgrid.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)


def records(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_the_standard_fields(json_lines):
    logger, buffer = json_lines
    logger.warning("two\nlines for %s", "one record")
    assert len(buffer.getvalue().splitlines()) == 1
    (entry,) = records(buffer)
    assert entry["message"] == "two\nlines for one record"
    assert entry["level"] == "WARNING" and entry["logger"] == "colgrid.test.json"
    assert entry["time"].endswith("+00:00") and entry["request_id"] == "-" and entry["caller"] == "-"


def test_request_id_and_caller_come_from_the_calls_context(json_lines):
    logger, buffer = json_lines
    rid, who = request_id.set("req-42"), caller.set("search-frontend")
    try:
        logger.info("answered")
    finally:
        request_id.reset(rid)
        caller.reset(who)
    (entry,) = records(buffer)
    assert (entry["request_id"], entry["caller"]) == ("req-42", "search-frontend")


def test_extra_fields_and_exceptions_are_kept(json_lines):
    logger, buffer = json_lines
    try:
        raise ValueError("bad vector")
    except ValueError:
        logger.exception("search failed", extra={"index": "docs", "k": 10})
    (entry,) = records(buffer)
    assert entry["index"] == "docs" and entry["k"] == 10
    assert "ValueError: bad vector" in entry["exception"]


def test_worker_threads_see_the_request_id_of_the_call_that_submitted_the_work():
    pool = WorkerPool(1, thread_name_prefix="test")
    token = request_id.set("req-worker")
    try:
        assert pool.submit(request_id.get).result(10) == "req-worker"
    finally:
        request_id.reset(token)
        pool.shutdown(wait=True)


def test_configure_logging_json_formats_the_root_logger():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("DEBUG", "json")
        assert root.level == logging.DEBUG
        assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
        configure_logging("INFO", "text")
        assert not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_a_refusal_is_logged_with_the_request_id_the_caller_sent(tmp_path):
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    auth_log = logging.getLogger("colgrid_server.security.auth")
    auth_log.addHandler(handler)
    create_key(tmp_path / "keys.json", "ops", ["admin"])
    server, thread = start_live_server(tmp_path / "data", api_keys_file=str(tmp_path / "keys.json"))
    try:
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError):
                channel.unary_unary("/colgrid.v1.RegistryService/ListIndexes")(
                    b"", metadata=(("x-request-id", "trace-7f3a"),), timeout=10)
    finally:
        auth_log.removeHandler(handler)
        stop_live_server(server, thread)
    (entry,) = records(buffer)
    assert entry["request_id"] == "trace-7f3a" and entry["code"] == "UNAUTHENTICATED"
    assert entry["method"] == "colgrid.v1.RegistryService/ListIndexes"


def test_serve_with_log_format_json_writes_json_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLGRID_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "colgrid_server.cli", "serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0",
         "--port", "0", "--log-format", "json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "colgrid serving on" in process.stdout.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    warning = next(e for e in entries if "without authentication" in e["message"])
    assert warning["level"] == "WARNING" and warning["logger"] == "colgrid_server.service.app"
    assert all({"time", "level", "logger", "message", "request_id"} <= e.keys() for e in entries)
