"""Synthetic corpora and a naive MaxSim reference, for tests and benchmarks that need real index
versions without an encoder (the way `zarr.testing` ships helpers for store tests).

Vectors are unit-norm noise around a few topic directions per document, so documents and
queries have structure that centroids can find. Each token i of a document is the word
"w<i>" of its text, with its real character span.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colgrid_server.index._format import EncoderRef, VersionSummary
from colgrid_server.index._writer import VersionWriter

SYNTHETIC_ENCODER = "synthetic"


@dataclass(frozen=True)
class SyntheticDocument:
    id: str
    vectors: np.ndarray  # float32 (n, dim), unit rows
    spans: np.ndarray  # int32 (n, 2)
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


class SyntheticCorpus:
    """Documents and queries made of "words": fixed vectors grouped around topic directions,
    with a little per-occurrence noise (context). A document and a query mix a few topics, so
    a document sharing the query's words scores high, as with text."""

    def __init__(self, dim: int = 32, *, topics: int = 40, words: int = 4000, noise: float = 0.15, seed: int = 0) -> None:
        self.dim, self.noise = dim, noise
        self._rng = np.random.default_rng(seed)
        self._n_topics = topics
        centres = self._unit(self._rng.standard_normal((topics, dim)))
        topic_of_word = np.arange(words) % topics
        self._words = self._unit(centres[topic_of_word] + self._gaussian(words, 1.0))
        self._words_of_topic = [np.flatnonzero(topic_of_word == t) for t in range(topics)]

    @property
    def encoder(self) -> EncoderRef:
        return EncoderRef(id=f"{SYNTHETIC_ENCODER}-{self.dim}", kind="colbert", dim=self.dim)

    def documents(self, n: int, *, min_tokens: int = 1, max_tokens: int = 40) -> list[SyntheticDocument]:
        docs = []
        for i in range(n):
            count = int(self._rng.integers(min_tokens, max_tokens + 1))
            vectors = self.vectors(count)
            words = [f"w{j}" for j in range(count)]
            starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
            spans = np.stack([starts, starts + [len(w) for w in words]], axis=1).astype(np.int32)
            docs.append(SyntheticDocument(f"doc-{i}", vectors, spans, " ".join(words), {"n": i, "title": f"Doc {i}"}))
        return docs

    def vectors(self, count: int, topics_per_text: int = 3) -> np.ndarray:
        """count unit vectors: words of topics_per_text random topics, float32."""
        topics = self._rng.choice(self._n_topics, size=topics_per_text, replace=False)
        pool = np.concatenate([self._words_of_topic[t] for t in topics])
        chosen = self._words[self._rng.choice(pool, size=count)]
        return self._unit(chosen + self._gaussian(count, self.noise))

    def _gaussian(self, rows: int, norm: float) -> np.ndarray:
        return norm * self._rng.standard_normal((rows, self.dim)) / np.sqrt(self.dim)

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_synthetic_version(
    path: Path, documents: Sequence[SyntheticDocument], encoder: EncoderRef, *, build_params: Mapping[str, Any] | None = None
) -> VersionSummary:
    with VersionWriter(Path(path), encoder=encoder, build_params=build_params) as writer:
        for doc in documents:
            writer.add(doc.id, doc.vectors, doc.spans, doc.text, doc.metadata)
        return writer.finalize()


def reference_maxsim(query: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """float64 MaxSim, one document at a time: the naive definition fast paths are checked against."""
    q = np.asarray(query, dtype=np.float64)
    return np.array([(q @ np.asarray(d, dtype=np.float64).T).max(axis=1).sum() for d in documents])
