"""A PostgreSQL server behind a Registry (psycopg 3): for several replicas sharing one registry.

The registry's portable SQL (see `_db`) is translated on the way: `?` placeholders become `%s`
(and a literal `%` becomes `%%`), and text columns created by a migration sort bytewise
(`COLLATE "C"`), as SQLite's do, whatever the database's default collation is.

Transactions (each on a connection of its own, from a small pool: the server calls the
registry from several threads at once):
- write: READ COMMITTED, and its first statement takes one transaction-scoped advisory lock, so
  write transactions run one at a time. READ COMMITTED is what makes that lock sufficient:
  every later statement reads a fresh snapshot, taken after the lock was granted, so it sees
  whatever the previous writer committed. (REPEATABLE READ would take its snapshot at the lock
  statement itself, before the wait, and a writer could decide on stale rows.)
- read: REPEATABLE READ READ ONLY, so its statements see one snapshot.
A pooled connection that died (server restart, idle timeout, failover) is noticed when the
transaction begins and replaced by a fresh one; a connection lost in the middle of a
transaction fails that transaction with a RegistryError (the caller retries the operation).
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import conninfo, errors

from colgrid_registry.errors import RegistryError, RegistryUnavailable

URL_SCHEMES = ("postgresql", "postgres")
# The one advisory lock key every colgrid write transaction takes: ASCII "colgrid" (0x636f6c67726964),
# so an operator can recognise it in pg_locks. Advisory locks are per database.
WRITE_LOCK_KEY = 0x636F6C67726964
CONNECT_TIMEOUT_S = 10
POOL_SIZE = 8

_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# Errors that mean "the database could not do it right now" (connection lost, server shutting
# down, lock wait timed out), as opposed to a wrong statement: they become RegistryError.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.lower().startswith(tuple(f"{s}://" for s in URL_SCHEMES))


def redact(url: str) -> str:
    """`url` without its password (in the user info or as a `password` parameter)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.split(':', 1)[0]}@{hosts}" if at else hosts
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class PostgresRow:
    """A result row addressed by column name or by position (as sqlite3.Row is)."""

    __slots__ = ("_values", "_names")

    def __init__(self, values: Sequence[Any], names: dict[str, int]) -> None:
        self._values = values
        self._names = names

    def __getitem__(self, key: str | int) -> Any:
        return self._values[self._names[key]] if isinstance(key, str) else self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __repr__(self) -> str:
        return f"PostgresRow({dict(zip(self._names, self._values))!r})"


def _row_factory(cursor: psycopg.Cursor) -> Any:
    names: dict[str, int] = {}
    for position, column in enumerate(cursor.description or ()):
        names.setdefault(column.name, position)  # the first of two equal names wins, as in sqlite3
    return lambda values: PostgresRow(values, names)


# Quoted literals and identifiers (kept as they are), placeholders, percent signs, the TEXT type.
_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\?|%|\bTEXT\b""", re.IGNORECASE)
_DDL = re.compile(r"\s*(CREATE|ALTER)\s+TABLE\b", re.IGNORECASE)


@lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """The registry's portable SQL as psycopg runs it."""
    ddl = _DDL.match(sql) is not None

    def token(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        if ddl and text.upper() == "TEXT":
            return 'TEXT COLLATE "C"'
        return text

    return _TOKENS.sub(token, sql)


def _why(exc: psycopg.Error) -> str:
    """The server's one-line message (str() adds the statement and a caret on more lines)."""
    return (exc.diag.message_primary if isinstance(exc, psycopg.DatabaseError) else None) or str(exc).strip()


class PostgresConnection:
    """One transaction's view of a connection: `execute` takes the registry's SQL as written."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor:
        return self._conn.execute(translate(sql), tuple(parameters))


class PostgresDatabase:
    """The PostgreSQL backend of `_db.Database`. `busy_timeout_s` bounds the wait for the write
    lock and for a free pooled connection, as it bounds SQLite's wait for its write lock."""

    def __init__(self, url: str, *, busy_timeout_s: float = 10.0, pool_size: int = POOL_SIZE) -> None:
        if not is_postgres_url(url):
            raise RegistryError(f"not a PostgreSQL URL: {redact(url)!r} (expected postgresql://user@host/db)")
        scheme, _, rest = url.partition("://")
        url = f"{scheme.lower()}://{rest}"  # libpq knows the lower-case schemes only
        self.url = url
        self._location = redact(url)
        self._busy_timeout_s = busy_timeout_s
        self._pool_size = pool_size
        self._idle: list[psycopg.Connection] = []
        self._open = 0
        self._closed = False
        self._changed = threading.Condition()
        try:
            params = conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise RegistryError(f"cannot read registry URL {self._location}: {exc}") from exc
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        params.setdefault("application_name", "colgrid")
        self._conninfo = conninfo.make_conninfo(**params)
        # Connect now, so that a wrong URL or an unreachable server fails at open.
        self._open += 1
        self._release(self._connect(), reusable=True)

    @property
    def location(self) -> str:
        return self._location

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[PostgresConnection]:
        conn = self._begin(write)
        reusable = False
        try:
            try:
                yield PostgresConnection(conn)
            except BaseException:
                if not (conn.closed or conn.broken):
                    try:
                        conn.execute("ROLLBACK")
                        reusable = True
                    except psycopg.Error:
                        pass
                raise
            try:
                conn.execute("COMMIT")
            except _UNAVAILABLE as exc:
                raise RegistryUnavailable(f"lost registry database {self._location} while committing; the "
                                    f"change may or may not have been applied: re-read and retry "
                                    f"({_why(exc)})") from exc
            reusable = True
        except _UNAVAILABLE as exc:
            raise RegistryUnavailable(f"registry database {self._location} failed a transaction: "
                                f"{_why(exc)}") from exc
        except (errors.InsufficientPrivilege, errors.InvalidSchemaName) as exc:
            raise RegistryError(f"registry database {self._location} refused: {_why(exc)}; the URL's user "
                                f"must be able to create tables in the database (or in the existing schema "
                                f"its search_path names) and to read and write them") from exc
        finally:
            self._release(conn, reusable=reusable)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._changed.notify_all()
        for conn in idle:
            conn.close()

    # -- connections ------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        """A new connection (the caller has counted it in `_open`)."""
        conn: psycopg.Connection | None = None
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, prepare_threshold=None,
                                   row_factory=_row_factory)
            # Bounds the wait for the write lock (the advisory lock is the only lock writers queue on).
            conn.execute(f"SET lock_timeout = {max(1, int(self._busy_timeout_s * 1000))}")
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            with self._changed:
                self._open -= 1
                self._changed.notify()
            raise RegistryUnavailable(f"cannot connect to registry database {self._location}: {exc}") from exc
        return conn

    def _acquire(self) -> psycopg.Connection:
        deadline = time.monotonic() + self._busy_timeout_s
        with self._changed:
            while True:
                if self._closed:
                    raise RegistryError(f"registry {self._location} is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._pool_size:
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RegistryUnavailable(f"registry {self._location}: all {self._pool_size} connections "
                                        f"stayed busy for {self._busy_timeout_s:g} s")
                self._changed.wait(remaining)
        return self._connect()

    def _release(self, conn: psycopg.Connection, *, reusable: bool) -> None:
        with self._changed:
            keep = reusable and not self._closed and not (conn.closed or conn.broken)
            if keep:
                self._idle.append(conn)
            else:
                self._open -= 1
            self._changed.notify()
        if not keep:
            conn.close()

    def _begin(self, write: bool) -> psycopg.Connection:
        """A connection inside a new transaction (holding the write lock if `write`). Pooled
        connections found dead on the way are dropped; at most every pooled one and a fresh one
        are tried."""
        last: Exception | None = None
        for _ in range(self._pool_size + 1):
            conn = self._acquire()
            try:
                conn.execute(_BEGIN_WRITE if write else _BEGIN_READ)
                if write:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                return conn
            except errors.LockNotAvailable as exc:
                self._abandon(conn)
                raise RegistryUnavailable(f"registry {self._location} is busy: another writer held the write lock "
                                    f"for more than {self._busy_timeout_s:g} s; retry") from exc
            except _UNAVAILABLE as exc:
                dead = conn.closed or conn.broken
                self._abandon(conn)
                if not dead:
                    raise RegistryError(f"registry database {self._location} refused a transaction: "
                                        f"{_why(exc)}") from exc
                last = exc
        raise RegistryError(f"registry database {self._location} keeps dropping connections: "
                            f"{last}") from last

    def _abandon(self, conn: psycopg.Connection) -> None:
        """Give back a connection whose transaction could not begin, rolled back if it still lives."""
        reusable = False
        if not (conn.closed or conn.broken):
            try:
                conn.execute("ROLLBACK")
                reusable = True
            except psycopg.Error:
                pass
        self._release(conn, reusable=reusable)
