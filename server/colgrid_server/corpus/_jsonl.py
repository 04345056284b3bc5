"""Writing documents as JSONL, the format `colgrid_server.documents.read_jsonl` reads."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from colgrid_server.documents import Document


def write_jsonl(documents: Iterable[Document], path: str | Path) -> int:
    """Write one JSON object (`id`, `text`, `metadata`) per line and return how many.

    The file appears complete or not at all: lines go to a temporary file in the same
    directory, which is fsynced and then renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for doc in documents:
                record = {"id": doc.id, "text": doc.text, "metadata": dict(doc.metadata)}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return count
