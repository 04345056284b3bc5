"""A build from memory-mapped vector files drops each block's input pages once written, so the
builder's resident memory does not grow with the input file (bench/README.md, Memory)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from colgrid_server.index._external import _release_rows


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_rows_leave_resident_memory_and_still_read_the_same(tmp_path):
    values = np.random.default_rng(0).standard_normal((40_000, 200)).astype(np.float32)  # 32 MB
    np.save(tmp_path / "tokens.npy", values)
    mapped = np.load(tmp_path / "tokens.npy", mmap_mode="r")
    assert float(np.asarray(mapped).sum()) == float(values.sum())  # every page read
    before = _rss_file_kb()
    for lo in range(0, 40_000, 7_000):
        _release_rows(mapped, lo, min(40_000, lo + 7_000))
    after = _rss_file_kb()
    assert before - after > 24_000  # most of the 31,250 KB left the process
    np.testing.assert_array_equal(np.asarray(mapped[123:4567]), values[123:4567])


def test_arrays_that_are_not_memory_mapped_are_left_alone():
    values = np.ones((10, 4), np.float32)
    _release_rows(values, 0, 10)
    _release_rows(values[::2], 0, 5)
    assert values.sum() == 40
