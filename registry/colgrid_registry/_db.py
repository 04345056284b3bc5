"""What the registry needs from a database: the seam where a backend plugs in.

The registry's SQL is one portable dialect: `?` placeholders, plain types (TEXT, INTEGER,
BIGINT), ISO-8601 UTC text timestamps, JSON as text, `INSERT ... ON CONFLICT ... DO UPDATE`.
A backend runs it as written (SQLite, `_sqlite.Database`) or translates placeholders (a psycopg
backend would turn `?` into `%s`; no registry statement contains a literal `?`).

The one semantic a backend must provide: a write transaction excludes every other write
transaction from its first statement to its commit (SQLite: `BEGIN IMMEDIATE`; PostgreSQL:
`pg_advisory_xact_lock` on one fixed key as the first statement). The registry reads, decides
and writes inside that one transaction, and allocates ids as MAX(id) + 1, so it relies on that.
Rollout writes are compare-and-set on `generation` as well, a second guard that needs nothing.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol


class Row(Protocol):
    """A result row addressed by column name or position (sqlite3.Row; a psycopg backend
    needs a row factory that allows both)."""

    def __getitem__(self, column: str | int) -> Any: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...  # Row | None

    def __iter__(self) -> Iterator[Any]: ...  # of Row


class Connection(Protocol):
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...


class Database(Protocol):
    @property
    def location(self) -> str: ...  # for messages: a path or a URL without its password

    def transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        """All-or-nothing: commits when the block ends normally, rolls back on any exception.
        A read transaction sees one snapshot; a write one is exclusive (see above)."""
        ...

    def close(self) -> None:
        """Idempotent; later transactions raise RegistryError."""
        ...
