"""Batching of query encodes across concurrent requests, with no added wait.

The first caller to arrive leads: it encodes every query waiting at that moment in one model
run. Callers arriving while a run is under way queue up; when it ends, the oldest of them leads
the next run with all of them. At low load each query runs alone at once; under load the model
sees batches (one ONNX Runtime call for N short queries costs far less than N calls). The
mechanism is `colgrid_server.batching.Batcher`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from colgrid_server.batching import Batcher

DEFAULT_MAX_BATCH = 32


class QueryBatcher(Batcher[str, Any]):
    """encode(text) from many threads; `encode_batch(texts)` runs one model call for a batch."""

    def __init__(self, encode_batch: Callable[[list[str]], Sequence[Any]], *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        super().__init__(encode_batch, max_batch=max_batch)

    def encode(self, text: str) -> Any:
        return self.submit(text)

    @property
    def encoded(self) -> int:
        """Queries encoded through the model calls made (`runs`)."""
        return self.items


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
