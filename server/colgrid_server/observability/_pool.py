"""The search worker pool, counted: how much work waits for a thread, runs, or was dropped."""
from __future__ import annotations

import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class WorkerPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that counts its work, and runs each task in the submitter's
    contextvars context (so a worker's log lines carry the call's request id).

    `dropped` counts tasks cancelled before a thread picked them up: a call whose deadline
    passed, or whose caller went away, while its work was queued.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self.workers = max_workers
        self._counts = threading.Lock()
        self._queued = 0
        self._running = 0
        self._completed = 0
        self._dropped = 0

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    @property
    def completed(self) -> int:
        return self._completed

    @property
    def dropped(self) -> int:
        return self._dropped

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        context = contextvars.copy_context()

        def run() -> Any:
            with self._counts:
                self._queued -= 1
                self._running += 1
            try:
                return context.run(fn, *args, **kwargs)
            finally:
                with self._counts:
                    self._running -= 1
                    self._completed += 1

        with self._counts:
            self._queued += 1
        try:
            future = super().submit(run)
        except BaseException:
            with self._counts:
                self._queued -= 1
            raise
        future.add_done_callback(self._count_dropped)
        return future

    def _count_dropped(self, future: Future) -> None:
        if future.cancelled():  # only a task no thread started can be cancelled
            with self._counts:
                self._queued -= 1
                self._dropped += 1
