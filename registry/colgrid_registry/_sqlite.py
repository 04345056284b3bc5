"""The SQLite file behind a Registry: where it is, how it is opened, how a transaction runs.

One connection per Registry, guarded by a lock: registry calls are short and rare next to
searches, and one connection keeps `close()` trivial. Several processes (or several Registry
objects) share the file through WAL; writes take the write lock up front (`BEGIN IMMEDIATE`), so
a read-then-write transaction never fails half-way on a lock upgrade, and `busy_timeout` makes
writers queue instead of failing.
"""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from colgrid_registry.errors import InvalidValue, RegistryError

SUPPORTED_LOCATIONS = "a filesystem path, sqlite:///absolute/path.db, or postgresql://user:password@host/db"


def sqlite_path(location: str | Path) -> Path:
    """The database file named by a path or a `sqlite:///abs/path.db` URL."""
    if isinstance(location, Path):
        return location
    if not isinstance(location, str) or not location.strip():
        raise InvalidValue(f"registry location must be {SUPPORTED_LOCATIONS}; got {location!r}",
                           field="registry_url")
    if "://" not in location:
        return Path(location)
    scheme, _, rest = location.partition("://")
    if scheme.lower() != "sqlite":
        raise InvalidValue(f"unsupported registry URL scheme {scheme!r} in {location!r}; supported: "
                           f"{SUPPORTED_LOCATIONS}",
                           field="registry_url")
    if not rest.startswith("/") or rest.rstrip("/") == "":
        raise InvalidValue(f"{location!r} has no absolute file path; write sqlite:///absolute/path.db "
                           f"(three slashes), or pass a plain filesystem path", field="registry_url")
    return Path(rest)


class SQLiteDatabase:
    """The embedded backend of `_db.Database`."""

    def __init__(self, path: Path, *, busy_timeout_s: float) -> None:
        self.path = path
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed pointer flip survives power loss, not only a killed process.
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RegistryError(f"cannot open registry database {path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn

    @property
    def location(self) -> str:
        return str(self.path)

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """All-or-nothing: commits when the block ends normally, rolls back on any exception.
        Reads also run in a transaction so that their several statements see one snapshot."""
        with self._lock:
            if self._conn is None:
                raise RegistryError(f"registry {self.path} is closed")
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
