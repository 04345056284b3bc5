"""Harness shared by the evaluation tests (pytest collects no tests from here).

One index, `docs`, of real stdlib docstrings on the tiny real encoder of the rollout tests:

    v1  documents 0-59 (stable)
    v2  documents 0-29 only: a degraded build, missing a quarter of the judged documents
    v3  documents 0-59 again: v1's twin, scoring exactly as v1 does

Judgements come from the corpus itself: the query is a document's first line, the document is
relevant with gain 2, and its module's own docstring (when it is another document of the
corpus) with gain 1. Queries are made for documents 0-39, so v2 lacks 10 of the 40 documents
judged most relevant.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from colgrid_registry import open_registry
from colgrid_server.builder import build_index
from colgrid_server.documents import Document
from colgrid_server.paths import DataDir
from tests.test_rollout_support import (  # noqa: F401 - fixtures
    INDEX, _once, rollout_documents, serving, tiny_checkpoint, tiny_encoder_dir)

CORPUS = 60
DEGRADED = 30
JUDGED = 40


def judged_queries(documents: Sequence[Document], count: int = JUDGED) -> list[dict]:
    """Query-set lines {query_id, query, relevant} made from the first `count` documents."""
    ids = {d.id for d in documents[:CORPUS]}
    lines = []
    for i, doc in enumerate(documents[:count]):
        relevant = {doc.id: 2.0}
        module = doc.metadata.get("module")
        if module and module != doc.id and module in ids:
            relevant[module] = 1.0
        first_line = doc.text.strip().splitlines()[0]
        lines.append({"query_id": f"q{i}", "query": first_line, "relevant": relevant})
    return lines


def write_jsonl(path: Path, lines: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def eval_template(tmp_path_factory: pytest.TempPathFactory, tiny_encoder_dir: Path,
                  rollout_documents: list[Document]) -> Path:
    def make() -> Path:
        root = tmp_path_factory.mktemp("evaluation-template")
        data = DataDir(root)
        with open_registry(data.registry_file) as registry:
            for docs, activate in ((rollout_documents[:CORPUS], True), (rollout_documents[:DEGRADED], False),
                                   (rollout_documents[:CORPUS], False)):
                build_index(data, registry, INDEX, docs, encoder_dir=tiny_encoder_dir, activate=activate,
                            progress=False)
        return root

    return _once(tmp_path_factory, "evaluation-template", make)


@pytest.fixture()
def eval_versions(tmp_path: Path, eval_template: Path) -> Path:
    """A data dir of its own (registry copied) over the template's v1, v2, v3 files."""
    template, data = DataDir(eval_template), DataDir(tmp_path)
    for suffix in ("", "-wal", "-shm"):
        source = template.registry_file.with_name(template.registry_file.name + suffix)
        if source.exists():
            shutil.copy2(source, data.registry_file.with_name(source.name))
    data.encoders.mkdir(parents=True)
    for encoder in template.encoders.iterdir():
        (data.encoders / encoder.name).symlink_to(encoder.resolve(), target_is_directory=True)
    return tmp_path


@pytest.fixture(scope="session")
def queries(rollout_documents: list[Document]) -> list[dict]:
    return judged_queries(rollout_documents)
