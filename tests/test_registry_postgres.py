"""The registry on a real PostgreSQL server: the SQLite suites' behaviour tests run again here,
unchanged, plus what only a server database has (migrations on an empty database, connection
pool and reconnects, the write lock, snapshots, collation, several processes).

How the SQLite suites run on PostgreSQL: their tests are collected into this module, so they get
this module's `registry` / `reg` fixtures (the same set-up, on a fresh PostgreSQL database), and
each suite's module-level `open_registry` name is pointed at that database for the test, so a
test that opens "a second registry on the same file" (or reopens one) opens a second Registry on
the same database. A guard fails any test that wrote a SQLite file instead.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import colgrid_registry
import tests.test_registry as catalog_suite
import tests.test_registry_concurrency as concurrency_suite
import tests.test_registry_evaluations as evaluations_suite
import tests.test_registry_replicas as replicas_suite
import tests.test_registry_rollouts as rollouts_suite
from colgrid_registry import (
    SCHEMA_VERSION, IncompatibleSchema, Registry, RegistryError, open_registry)
from colgrid_registry._postgres import PostgresDatabase, PostgresRow, redact, translate
from colgrid_registry._schema import MIGRATIONS, migrate
from tests.postgres_server import create_database, drop_database, postgres_url  # noqa: F401

SUITES = (catalog_suite, rollouts_suite, evaluations_suite, replicas_suite, concurrency_suite)
# Bound to SQLite itself (a subprocess given a file path); restated for PostgreSQL below.
SQLITE_ONLY = {"test_two_processes_allocate_distinct_versions"}
ENCODER = concurrency_suite.ENCODER
SHA = "cd" * 32


def _suite_tests() -> dict[str, object]:
    """Every test of the suites that works on a registry (takes one, or a path to open one)."""
    found = {}
    for suite in SUITES:
        for name, test in vars(suite).items():
            if (name.startswith("test_") and name not in SQLITE_ONLY and callable(test)
                    and {"registry", "reg", "tmp_path"} & set(inspect.signature(test).parameters)):
                assert name not in found, f"{name} is in two suites; collect it under another name"
                found[name] = test
    return found


globals().update(_suite_tests())


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def suites_open_this_database(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def open_here(location: object = None, **options) -> Registry:
        return open_registry(postgres_url, **options)

    for suite in SUITES:
        monkeypatch.setattr(suite, "open_registry", open_here)
    yield
    assert not list(tmp_path.rglob("*.db")), "a test opened a SQLite registry instead of PostgreSQL"


def _ready_versions(registry: Registry, count: int, sha: str) -> None:
    for _ in range(count):
        version = registry.allocate_version("docs", **ENCODER).version
        registry.mark_ready("docs", version, documents=1, tokens=1, manifest_sha256=sha)


@pytest.fixture
def registry(postgres_url: str) -> Iterator[Registry]:
    """tests/test_registry.py's fixture: index "docs", no versions."""
    with open_registry(postgres_url) as reg:
        reg.create_index("docs")
        yield reg


@pytest.fixture
def reg(request: pytest.FixtureRequest, postgres_url: str) -> Iterator[Registry]:
    """The `reg` fixture of the suite the test comes from, on PostgreSQL."""
    suite = request.function.__module__
    with open_registry(postgres_url) as registry:
        if suite == rollouts_suite.__name__:  # READY v1, v2, v3; v1 stable (generation 1)
            registry.create_index("docs")
            _ready_versions(registry, 3, rollouts_suite.SHA)
            registry.set_stable("docs", "v1")
        elif suite == evaluations_suite.__name__:  # READY v1 and v2
            registry.create_index("docs")
            _ready_versions(registry, 2, evaluations_suite.SHA)
        else:
            assert suite == replicas_suite.__name__, f"no PostgreSQL set-up for {suite}'s `reg`"
        yield registry


def admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def applied(url: str) -> list[int]:
    with admin(url) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def tables(url: str) -> set[str]:
    with admin(url) as conn:
        return {row[0] for row in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}


# -- opening and migrations ----------------------------------------------------------------------------

def test_opening_an_empty_database_applies_every_migration(postgres_url: str) -> None:
    open_registry(postgres_url).close()
    assert applied(postgres_url) == [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    assert tables(postgres_url) == {"schema_migrations", "indexes", "versions", "rollouts", "audit_log",
                                    "replicas", "evaluations"}


def test_reopening_applies_no_migration_twice(postgres_url: str) -> None:
    open_registry(postgres_url).close()
    open_registry(postgres_url.replace("postgresql://", "POSTGRES://")).close()
    assert applied(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_replicas_opening_an_empty_database_together_migrate_it_once(postgres_url: str) -> None:
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def open_one() -> None:
        start.wait()
        try:
            with open_registry(postgres_url) as reg:
                reg.ensure_index("docs")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert applied(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_opening_an_older_database_upgrades_it_and_keeps_its_data(postgres_url: str) -> None:
    database = PostgresDatabase(postgres_url)
    with database.transaction(write=True) as conn:
        migrate(conn, MIGRATIONS[:1])
        conn.execute("INSERT INTO indexes (name, created_at) VALUES ('docs', '2024-01-02T03:04:05.000000+00:00')")
    database.close()
    assert applied(postgres_url) == [1]
    with open_registry(postgres_url) as reg:
        assert [i.name for i in reg.list_indexes()] == ["docs"]
        assert reg.get_rollout("docs").generation == 0  # the upgrade gave the old index its rollout
    assert applied(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_a_database_from_a_newer_colgrid_is_refused(postgres_url: str) -> None:
    open_registry(postgres_url).close()
    with admin(postgres_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 'later')")
    with pytest.raises(IncompatibleSchema, match="999.*newer.*upgrade colgrid"):
        open_registry(postgres_url)


def test_a_failing_migration_leaves_the_database_untouched(postgres_url: str) -> None:
    with admin(postgres_url) as conn:
        conn.execute("CREATE TABLE rollouts (x TEXT)")  # makes migration 2 fail half-way
    with pytest.raises(psycopg.errors.DuplicateTable):
        open_registry(postgres_url)
    assert tables(postgres_url) == {"rollouts"}  # PostgreSQL DDL is transactional too


def test_rollout_pointer_cannot_name_a_missing_version_even_in_raw_sql(registry: Registry) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        with registry._db.transaction(write=True) as conn:
            conn.execute("UPDATE rollouts SET stable = 'ghost' WHERE index_name = 'docs'")
    assert registry.get_rollout("docs").stable is None


def test_names_sort_bytewise_as_in_sqlite_whatever_the_database_collation() -> None:
    names = ["docs-b", "docsa", "docs.z", "docs_1", "docs0", "a"]
    url = create_database(TEMPLATE="template0", LOCALE_PROVIDER="icu", ICU_LOCALE="'en-US'")
    try:
        with admin(url) as conn:  # the premise: this database's own text order is not bytewise
            own = [r[0] for r in conn.execute("SELECT x FROM unnest(%s::text[]) AS x ORDER BY x", (names,))]
        assert own != sorted(names)
        with open_registry(url) as reg:
            for name in names:
                reg.create_index(name)
                reg.heartbeat(name, address="a:1", served={})
            assert [i.name for i in reg.list_indexes()] == sorted(names)
            assert [r.replica_id for r in reg.list_replicas()] == sorted(names)
    finally:
        drop_database(url)


# -- locations and errors ------------------------------------------------------------------------------

def test_the_location_names_the_database_without_its_password(postgres_url: str) -> None:
    with_password = postgres_url.replace("postgres@", "postgres:hunter2@") + "&password=hunter2&sslmode=disable"
    with open_registry(with_password) as reg:  # trust authentication: the password is not checked
        reg.create_index("docs")
        assert "hunter2" not in repr(reg) and reg.path is None
        assert repr(reg) == f"Registry({postgres_url + '&sslmode=disable'!r})"


def test_redact_keeps_user_hosts_and_other_parameters() -> None:
    assert redact("postgresql://alice:s3cret@db1:5432,db2:5433/reg?sslmode=require&password=x") == \
        "postgresql://alice@db1:5432,db2:5433/reg?sslmode=require"
    assert redact("postgres://db/reg") == "postgres://db/reg"


def test_an_unreachable_server_fails_at_open_with_a_registry_error_without_the_password() -> None:
    with pytest.raises(RegistryError, match=r"cannot connect to registry database postgresql://bob@127\.0\.0\.1:1/x") \
            as caught:
        open_registry("postgresql://bob:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("may_use_schema, refusal", [(True, "permission denied for schema"),
                                                     (False, "no schema has been selected")])
def test_a_user_without_the_right_to_create_tables_gets_a_registry_error_saying_so(
        postgres_url: str, may_use_schema: bool, refusal: str) -> None:
    with admin(postgres_url) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'colgrid_reader'").fetchone() is None:
            conn.execute("CREATE ROLE colgrid_reader LOGIN")
        if may_use_schema:
            conn.execute(conn.execute("SELECT format('GRANT USAGE ON SCHEMA %I TO colgrid_reader', "
                                      "current_schema())").fetchone()[0])
    with pytest.raises(RegistryError, match=f"{refusal}.*must be able to create tables"):
        open_registry(postgres_url.replace("postgresql://postgres@", "postgresql://colgrid_reader@"))
    assert tables(postgres_url) == set()


def test_placeholders_become_psycopg_ones_and_literals_stay() -> None:
    assert translate("SELECT * FROM t WHERE a = ? AND b LIKE 'x?%' AND c = ?") == \
        "SELECT * FROM t WHERE a = %s AND b LIKE 'x?%' AND c = %s"
    assert translate("SELECT 5 % 2") == "SELECT 5 %% 2"
    assert translate("CREATE TABLE t (name TEXT PRIMARY KEY, n INTEGER)") == \
        'CREATE TABLE t (name TEXT COLLATE "C" PRIMARY KEY, n INTEGER)'
    assert translate('ALTER TABLE t ADD COLUMN note text, ADD COLUMN "TEXT" INTEGER DEFAULT \'TEXT\'') == \
        'ALTER TABLE t ADD COLUMN note TEXT COLLATE "C", ADD COLUMN "TEXT" INTEGER DEFAULT \'TEXT\''
    assert translate("SELECT 'TEXT', context FROM t") == "SELECT 'TEXT', context FROM t"


def test_rows_are_addressed_by_column_name_or_position(registry: Registry) -> None:
    with registry._db.transaction(write=False) as conn:
        row = conn.execute("SELECT name, created_at FROM indexes WHERE name = ?", ("docs",)).fetchone()
    assert isinstance(row, PostgresRow)
    assert row["name"] == row[0] == "docs" and row["created_at"] == row[1]
    assert row.keys() == ["name", "created_at"] and len(row) == 2


# -- transactions --------------------------------------------------------------------------------------

class HeldWrite:
    """A write transaction held open in another thread until `release()`."""

    def __init__(self, registry: Registry) -> None:
        self._entered, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(registry,), daemon=True)
        self._thread.start()
        assert self._entered.wait(10)

    def _hold(self, registry: Registry) -> None:
        with registry._db.transaction(write=True) as conn:
            conn.execute("INSERT INTO replicas (replica_id, address, served_json, last_seen) "
                         "VALUES ('holder', 'h:1', '{}', '2024-01-01T00:00:00+00:00')")
            self._entered.set()
            self._release.wait(30)

    def release(self) -> None:
        self._release.set()
        self._thread.join(10)


def test_a_writer_waits_for_the_write_transaction_before_it_and_then_sees_its_rows(postgres_url: str) -> None:
    with open_registry(postgres_url) as first, open_registry(postgres_url) as second:
        held = HeldWrite(first)
        done = threading.Event()

        def write() -> None:
            second.heartbeat("writer", address="w:1", served={})
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert not done.wait(0.5)  # queued behind the held write transaction
        assert [r.replica_id for r in second.list_replicas()] == []  # reads are not blocked, see the past
        held.release()
        assert done.wait(10)
        writer.join(10)
        assert [r.replica_id for r in second.list_replicas()] == ["holder", "writer"]


def test_a_writer_that_waits_longer_than_the_busy_timeout_gets_a_registry_error(postgres_url: str) -> None:
    with open_registry(postgres_url) as first, open_registry(postgres_url, busy_timeout_s=0.3) as impatient:
        held = HeldWrite(first)
        started = time.monotonic()
        try:
            with pytest.raises(RegistryError, match="busy.*write lock.*retry"):
                impatient.create_index("docs")
        finally:
            held.release()
        assert 0.3 <= time.monotonic() - started < 5
        assert impatient.create_index("docs").name == "docs"  # its connection still works


def test_a_read_transaction_sees_one_snapshot(postgres_url: str) -> None:
    with open_registry(postgres_url) as reader, open_registry(postgres_url) as writer:
        writer.create_index("docs")
        _ready_versions(writer, 1, SHA)
        query = "SELECT generation FROM rollouts WHERE index_name = ?"
        with reader._db.transaction(write=False) as conn:
            before = conn.execute(query, ("docs",)).fetchone()["generation"]
            writer.set_stable("docs", "v1")  # commits while the read is open
            assert conn.execute(query, ("docs",)).fetchone()["generation"] == before
        assert reader.get_rollout("docs").generation == before + 1


def test_more_threads_than_pooled_connections_all_get_their_turn(postgres_url: str) -> None:
    with open_registry(postgres_url) as reg:
        reg.create_index("docs")
        threads = [threading.Thread(target=lambda: [reg.allocate_version("docs", **ENCODER) for _ in range(5)])
                   for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(int(v.version[1:]) for v in reg.list_versions("docs")) == list(range(1, 81))


# -- dropped connections -------------------------------------------------------------------------------

def terminate_backends(url: str, *, except_pid: int | None = None) -> int:
    """Kill the server processes of every other connection to the database (as a restart or a
    failover would); returns how many."""
    with admin(url) as conn:
        return conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> %s",
            (except_pid or 0,)).fetchone()[0]


def test_pooled_connections_that_died_are_replaced_without_an_error(postgres_url: str) -> None:
    with open_registry(postgres_url) as reg:
        reg.create_index("docs")
        assert terminate_backends(postgres_url) >= 1
        time.sleep(0.1)  # let the terminations land
        assert [i.name for i in reg.list_indexes()] == ["docs"]
        terminate_backends(postgres_url)
        time.sleep(0.1)
        assert reg.create_index("faq").name == "faq"


def test_a_connection_lost_mid_transaction_fails_that_call_only(postgres_url: str) -> None:
    with open_registry(postgres_url) as reg:
        reg.create_index("docs")
        with pytest.raises(RegistryError, match="failed a transaction"):
            with reg._db.transaction(write=False) as conn:
                conn.execute("SELECT 1")
                terminate_backends(postgres_url)
                time.sleep(0.1)
                conn.execute("SELECT 1")
        assert [i.name for i in reg.list_indexes()] == ["docs"]


# -- several processes ----------------------------------------------------------------------------------

def run_processes(count: int, body: str, url: str, tmp_path: Path) -> list[list[str]]:
    """Run `body` (with `reg` open on `url`, and `worker` its number) in `count` processes that
    start together; returns each one's printed lines."""
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from colgrid_registry import GenerationConflict, InvalidTransition, open_registry
        worker = int(sys.argv[1])
        reg = open_registry({url!r})
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.005)
    """) + textwrap.dedent(body) + "\nreg.close()\n"
    workers = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(count)]
    go.touch()
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0] * count, [err for _, err in outputs]
    return [out.split() for out, _ in outputs]


def test_processes_opening_an_empty_database_together_allocate_distinct_versions(postgres_url: str,
                                                                               tmp_path: Path) -> None:
    outputs = run_processes(3, f"""
        reg.ensure_index("docs")
        for _ in range(20):
            print(reg.allocate_version("docs", **{ENCODER!r}).version)
    """, postgres_url, tmp_path)
    names = [n for out in outputs for n in out]
    assert sorted(names, key=lambda n: int(n[1:])) == [f"v{i}" for i in range(1, 61)]
    assert applied(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_racing_processes_produce_one_unbroken_chain_of_generations(postgres_url: str, tmp_path: Path) -> None:
    """Each process reads the rollout and tries the next canary step at that generation: every
    success is one generation and one audit entry, none is lost or applied twice."""
    with open_registry(postgres_url) as reg:
        reg.create_index("docs")
        _ready_versions(reg, 3, SHA)
        reg.set_stable("docs", "v1")
    outputs = run_processes(3, """
        wins = 0
        for _ in range(15):
            seen = reg.get_rollout("docs")
            try:
                if seen.canary is None:
                    reg.start_canary("docs", "v3" if seen.stable != "v3" else "v2", 10,
                                     expected_generation=seen.generation)
                elif worker % 2:
                    reg.promote("docs", expected_generation=seen.generation)
                else:
                    reg.abort_canary("docs", expected_generation=seen.generation)
                wins += 1
            except (GenerationConflict, InvalidTransition):
                pass
        print(wins)
    """, postgres_url, tmp_path)
    wins = sum(int(out[0]) for out in outputs)
    with open_registry(postgres_url) as reg:
        entries = list(reversed(reg.audit_log("docs", limit=1000)))
        assert wins >= 1
        assert reg.get_rollout("docs").generation == 1 + wins == len(entries)
    assert [e.after["generation"] for e in entries] == list(range(1, wins + 2))
    assert all(e.before == prior.after for prior, e in zip(entries, entries[1:]))
