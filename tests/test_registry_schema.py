"""Opening the registry: locations, SQLite settings and schema migrations."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from colgrid_registry import (
    SCHEMA_VERSION, IncompatibleSchema, InvalidValue, Registry, RegistryError, open_registry)
from colgrid_registry._schema import MIGRATIONS, migrate


def applied(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_opening_a_new_path_creates_the_file_and_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "registry.db"
    open_registry(path).close()
    assert path.is_file()
    assert applied(path) == [m.version for m in MIGRATIONS]


def test_opening_an_empty_file_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.touch()
    with open_registry(path) as reg:
        reg.create_index("docs")
    assert applied(path) == list(range(1, SCHEMA_VERSION + 1))


def test_reopening_applies_no_migration_twice(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    open_registry(path).close()
    open_registry(path).close()
    assert applied(path) == list(range(1, SCHEMA_VERSION + 1))


def test_opening_an_older_database_upgrades_it_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    migrate(conn, MIGRATIONS[:1])
    conn.execute("INSERT INTO indexes (name, created_at) VALUES ('docs', '2024-01-02T03:04:05.000000+00:00')")
    conn.execute("COMMIT")
    conn.close()
    with open_registry(path) as reg:
        assert [i.name for i in reg.list_indexes()] == ["docs"]
        assert reg.get_rollout("docs").generation == 0  # the upgrade gave the old index its rollout
    assert applied(path) == list(range(1, SCHEMA_VERSION + 1))


def test_opening_a_schema_2_database_adds_replicas_and_evaluations_and_keeps_rollouts(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    migrate(conn, MIGRATIONS[:2])
    at = "2024-01-02T03:04:05.000000+00:00"
    conn.execute("INSERT INTO indexes (name, created_at) VALUES ('docs', ?)", (at,))
    for seq in (1, 2):
        conn.execute("INSERT INTO versions (index_name, name, seq, state, encoder_id, encoder_kind, dim, "
                     "documents, tokens, storage_uri, build_params, manifest_sha256, created_at, updated_at) "
                     "VALUES ('docs', ?, ?, 'READY', 'enc', 'colbert', 4, 1, 1, '/x', '{}', ?, ?, ?)",
                     (f"v{seq}", seq, "ab" * 32, at, at))
    conn.execute("INSERT INTO rollouts (index_name, stable, canary_percent, shadow_percent, generation, "
                 "updated_at) VALUES ('docs', 'v1', 0, 0, 3, ?)", (at,))
    conn.execute("INSERT INTO audit_log VALUES (1, 'docs', ?, 'bob', 'set_stable', '', '{}', '{}')", (at,))
    conn.execute("COMMIT")
    conn.close()
    with open_registry(path) as reg:
        rollout = reg.get_rollout("docs")
        assert (rollout.stable, rollout.generation) == ("v1", 3)
        assert reg.start_canary("docs", "v2", 10, expected_generation=3).generation == 4
        assert [(e.id, e.action) for e in reg.audit_log("docs")] == [(2, "start_canary"), (1, "set_stable")]
        reg.heartbeat("replica-a", address="a:1", served={"docs": 4})
        assert reg.list_replicas()[0].acknowledges("docs", 4)
        reg.record_evaluation("docs", "v2", metrics={"ndcg@10": 0.5}, query_set="qs")
        assert len(reg.evaluations("docs", "v2")) == 1
    assert applied(path) == [1, 2, 3, 4] == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_from_a_newer_colgrid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    open_registry(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 'later')")
    with pytest.raises(IncompatibleSchema, match="999.*newer.*upgrade colgrid"):
        open_registry(path)


def test_a_failing_migration_leaves_the_database_untouched(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE rollouts (x TEXT)")  # makes migration 2 fail half-way
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("BEGIN")
        try:
            migrate(conn)
        finally:
            conn.execute("ROLLBACK")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"rollouts"}


def test_sqlite_url_with_absolute_path_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "via-url.db"
    with open_registry(f"sqlite://{path}") as reg:
        reg.create_index("docs")
        assert reg.path == path
    with open_registry(str(path)) as reg:
        assert [i.name for i in reg.list_indexes()] == ["docs"]


@pytest.mark.parametrize("url", ["mysql://x/y", "s3://bucket/registry.db"])
def test_unknown_url_scheme_is_a_value_error_listing_supported_ones(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported registry URL scheme.*sqlite:///"):
        open_registry(url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite://relative.db", ""])
def test_sqlite_url_without_an_absolute_path_is_refused(url: str) -> None:
    with pytest.raises(InvalidValue):
        open_registry(url)


def test_database_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with open_registry(path) as reg:
        reg.create_index("docs")
        with reg._db.transaction(write=False) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_rollout_pointer_cannot_name_a_missing_version_even_in_raw_sql(tmp_path: Path) -> None:
    with open_registry(tmp_path / "registry.db") as reg:
        reg.create_index("docs")
        with pytest.raises(sqlite3.IntegrityError):
            with reg._db.transaction(write=True) as conn:
                conn.execute("UPDATE rollouts SET stable = 'ghost' WHERE index_name = 'docs'")
        assert reg.get_rollout("docs").stable is None


def test_a_file_that_is_not_a_database_raises_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="cannot open registry"):
        open_registry(path)


def test_a_registry_runs_on_a_database_object_it_is_given_and_closes_it(tmp_path: Path) -> None:
    """The backend seam (colgrid_registry._db.Database): a server-database backend plugs in here."""
    from colgrid_registry._sqlite import SQLiteDatabase

    database = SQLiteDatabase(tmp_path / "given.db", busy_timeout_s=1.0)
    with Registry(database) as reg:
        reg.create_index("docs")
        assert reg.path == tmp_path / "given.db"
    with pytest.raises(RegistryError, match="closed"):
        with database.transaction(write=False):
            pass
    assert applied(tmp_path / "given.db") == list(range(1, SCHEMA_VERSION + 1))
