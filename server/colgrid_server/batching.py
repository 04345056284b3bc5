"""Leader/follower batching across threads: callers submit one item each; one model or kernel
run serves every item waiting.

The first caller to arrive leads: it runs every item waiting at that moment as one batch.
Callers arriving while a run is under way queue up; when it ends, the oldest of them leads the
next run with all of them. At low load each item runs alone at once; under load the runs see
batches. max_delay (Triton's max queue delay) lets a leader wait a little for a fuller batch:
worth it where one run of N items costs far less than N runs (a GPU kernel launch). With
expect_more, the leader waits only while more items are on their way (e.g. searches still
generating candidates), so an idle server adds no latency.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass
class _Request:
    item: Any
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Batcher(Generic[ItemT, ResultT]):
    """submit(item) from many threads; run_batch(items) -> one result per item, in order. A
    batch that raises is retried item by item, so a bad item fails alone."""

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        max_batch: int,
        max_delay: float = 0.0,
        expect_more: Callable[[int], bool] | None = None,
    ) -> None:
        """expect_more(pending) -> whether items beyond the pending ones will arrive soon (the
        leader's delay is spent only then); None: always wait out max_delay for a full batch."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_delay < 0:
            raise ValueError("max_delay must not be negative")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._expect_more = expect_more
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._pending: list[_Request] = []
        self._running = False
        self.runs = 0  # batches run
        self.items = 0  # items served through them

    def submit(self, item: ItemT) -> ResultT:
        request = _Request(item)
        with self._lock:
            self._pending.append(request)
            request.lead = not self._running
            self._running = True
            self._arrived.notify_all()
        if not request.lead:
            request.wake.wait()
        if not request.done:  # woken to lead the next run (which includes this request)
            self._run()
        if request.error is not None:
            raise request.error
        return request.result

    def _run(self) -> None:
        with self._lock:
            if self._max_delay > 0:
                deadline = time.monotonic() + self._max_delay
                while (
                    len(self._pending) < self._max_batch
                    and (self._expect_more is None or self._expect_more(len(self._pending)))
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._arrived.wait(left)
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        try:
            self._serve(batch)
        finally:
            with self._lock:
                self.runs += 1
                self.items += len(batch)
                successor = self._pending[0] if self._pending else None
                self._running = successor is not None
            for request in batch:
                request.done = True
                if not request.lead:
                    request.wake.set()
            if successor is not None:
                successor.wake.set()  # not done: it leads the next run

    def _serve(self, batch: list[_Request]) -> None:
        try:
            results = self._run_batch([r.item for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items returned {len(results)} results")
            for request, result in zip(batch, results):
                request.result = result
        except Exception as exc:  # noqa: BLE001 - one bad item must not fail its companions
            if len(batch) == 1:
                batch[0].error = exc
                return
            for request in batch:
                self._serve([request])
