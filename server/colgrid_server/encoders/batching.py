"""Batching of query encodes across concurrent requests, with no added wait.

The first caller to arrive leads: it encodes every query waiting at that moment in one model
run. Callers arriving while a run is under way queue up; when it ends, the oldest of them leads
the next run with all of them. At low load each query runs alone at once; under load the model
sees batches (one ONNX Runtime call for N short queries costs far less than N calls).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BATCH = 32


@dataclass
class _Request:
    text: str
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class QueryBatcher:
    """encode(text) from many threads; `encode_batch(texts)` runs one model call for a batch."""

    def __init__(self, encode_batch: Callable[[list[str]], Sequence[Any]], *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._encode_batch = encode_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._running = False
        self.runs = 0  # model calls made
        self.encoded = 0  # queries encoded through them

    def encode(self, text: str) -> Any:
        request = _Request(text)
        with self._lock:
            self._pending.append(request)
            request.lead = not self._running
            self._running = True
        if not request.lead:
            request.wake.wait()
        if not request.done:  # woken to lead the next run (which includes this request)
            self._run()
        if request.error is not None:
            raise request.error
        return request.result

    def _run(self) -> None:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        try:
            self._encode_into(batch)
        finally:
            with self._lock:
                self.runs += 1
                self.encoded += len(batch)
                successor = self._pending[0] if self._pending else None
                self._running = successor is not None
            for request in batch:
                request.done = True
                if not request.lead:
                    request.wake.set()
            if successor is not None:
                successor.wake.set()  # not done: it leads the next run

    def _encode_into(self, batch: list[_Request]) -> None:
        try:
            results = self._encode_batch([r.text for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"encoder returned {len(results)} results for {len(batch)} queries")
            for request, result in zip(batch, results):
                request.result = result
        except Exception as exc:  # noqa: BLE001 - one bad query must not fail its companions
            if len(batch) == 1:
                batch[0].error = exc
                return
            for request in batch:
                self._encode_into([request])


class BatchingEncoder:
    """An encoder whose single-query encodes are batched across threads; everything else
    (encode_documents, encode_images, id, kind, dim, spec...) is the wrapped encoder's."""

    def __init__(self, encoder: Any, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.inner = encoder
        self.batcher = QueryBatcher(lambda texts: encoder.encode_queries(texts), max_batch=max_batch)

    def encode_queries(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(texts, (list, tuple)) and len(texts) == 1 and not args and not kwargs:
            return [self.batcher.encode(texts[0])]
        return self.inner.encode_queries(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"BatchingEncoder({self.inner!r})"
