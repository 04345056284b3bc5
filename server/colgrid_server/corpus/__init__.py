"""Real text for demos, tests and benchmarks: docstrings of installed Python sources."""
from __future__ import annotations

from colgrid_server.corpus._docstrings import SKIPPED_DIRS, iter_docstring_documents
from colgrid_server.corpus._jsonl import write_jsonl

__all__ = ["SKIPPED_DIRS", "iter_docstring_documents", "write_jsonl"]
