"""What the load script searches: a demo-sized index (built once, cached in the work dir) and a
mixed pool of queries taken from docstrings the index does not hold."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

INDEX = "stdlib"
HELD_OUT = 400  # docstrings after the indexed ones, for queries

# Requests the server must refuse, each with the SDK error it must raise; sent on their own
# one-query streams and counted apart from the real traffic.
BAD_REQUESTS = {
    "k-over-limit": ({"k": 100_000}, "InvalidArgumentError"),
    "empty-query": ({"query": "   "}, "InvalidArgumentError"),
    "query-too-long": ({"query": "token " * 1000}, "InvalidArgumentError"),
    "unknown-index": ({}, "NotFoundError"),  # sent to index UNKNOWN_INDEX
}
UNKNOWN_INDEX = "no-such-index"


@dataclass(frozen=True)
class QueryPool:
    short: tuple[str, ...]   # 1-3 words
    medium: tuple[str, ...]  # a first sentence
    long: tuple[str, ...]    # a whole docstring, up to 2,000 characters

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        """(kind, stream query dict): mixed lengths, k from 1 to 100, explain on ~1 in 8,
        nprobe/n_candidates overridden on ~1 in 10."""
        kind = rng.choices(["short", "medium", "long"], weights=[3, 5, 2])[0]
        query: dict = {"query": rng.choice(getattr(self, kind)), "k": rng.choice([1, 5, 10, 10, 20, 50, 100])}
        if rng.random() < 0.125:
            query["explain"] = True
            kind += "+explain"
        if rng.random() < 0.1:
            query["nprobe"] = rng.choice([2, 4, 8, 16])
            query["n_candidates"] = max(query["k"], rng.choice([64, 256, 1024]))  # the server wants >= k
        return kind, query


def query_pool(documents: int) -> QueryPool:
    from colgrid_server.corpus import iter_docstring_documents

    docs = list(iter_docstring_documents(limit=documents + HELD_OUT))
    held = docs[documents:] or docs  # a small corpus may have no held-out docstrings left
    sentences = [re.split(r"(?<=[.!?])\s", d.text.strip(), maxsplit=1)[0][:300] for d in held]
    words = [s.split() for s in sentences]
    return QueryPool(
        short=tuple(" ".join(w[:n]) for w, n in zip(words, [1, 2, 3] * len(words)) if w),
        medium=tuple(s for s in sentences if s.strip()),
        long=tuple(d.text[:2000] for d in held if d.text.strip()))


def prepare_index(work_dir: Path, documents: int, encoder_dir: Path | None) -> Path:
    """A data dir whose INDEX serves `documents` stdlib docstrings at its stable version, built
    once per (documents, encoder) and reused after."""
    from colgrid_registry import open_registry
    from colgrid_server.builder import build_index
    from colgrid_server.corpus import iter_docstring_documents
    from colgrid_server.paths import DataDir

    tag = f"{documents}docs-" + (encoder_dir.resolve().name if encoder_dir else "minilm")
    data = DataDir(work_dir / f"data-{tag}")
    data.root.mkdir(parents=True, exist_ok=True)
    with open_registry(data.registry_file) as registry:
        registry.ensure_index(INDEX)
        if registry.get_rollout(INDEX).stable is None:
            print(f"building {INDEX!r} from {documents} stdlib docstrings into {data.root} (once)", flush=True)
            outcome = build_index(data, registry, INDEX, iter_docstring_documents(limit=documents),
                                  encoder_dir=encoder_dir, build_params={"corpus": "python-stdlib-docstrings"},
                                  reason="load test")
            print(f"built {INDEX}/{outcome.version}: {outcome.summary.documents} documents, "
                  f"{outcome.summary.tokens} tokens", flush=True)
    return data.root
