"""A real, throwaway PostgreSQL server for the registry tests (pytest collects no tests here).

Import the fixture where it is used: `from tests.postgres_server import postgres_url  # noqa: F401`.
Each test gets its own empty schema (or, with `create_database`, database) on one cluster per
test session. The cluster is started
on first use (initdb into a temporary directory, pg_ctl on a free 127.0.0.1 port, its unix
socket in that directory; durability off, it is thrown away) and stopped when the session's
process exits: a module-level singleton rather than a session fixture, because a session
fixture imported into several modules runs once per module.

PostgreSQL refuses to run as root, so as root (CI) the server runs as the unprivileged user
`colgrid-pg`, created if missing. Without server binaries the tests FAIL, saying how to install
them (bash scripts/postgres.sh install): a registry backend that was never tested is not skipped.
"""
from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_USER = "colgrid-pg"
SUPERUSER = "postgres"
INSTALL_HINT = "run `bash scripts/postgres.sh install` (as root with apt-get, or install the PostgreSQL server)"


@dataclass(frozen=True)
class Cluster:
    root: Path          # data/, the socket and the log live here
    port: int
    bindir: Path
    run_as: str | None  # the user the server runs as, when we are root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10)

    def pg_ctl(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run_as(self.run_as, [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), *arguments],
                       check=check)


def _bindir() -> Path:
    found = subprocess.run(["bash", str(REPO / "scripts" / "postgres.sh"), "bindir"], capture_output=True,
                           text=True)
    if found.returncode != 0:
        pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) are not installed; {INSTALL_HINT}",
                    pytrace=False)
    return Path(found.stdout.strip())


def _run_as(user: str | None, command: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    if user is not None:
        command = ["runuser", "-u", user, "--", *command] if shutil.which("runuser") else \
            ["su", "-s", "/bin/sh", user, "-c", " ".join(_quote(c) for c in command)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _server_user() -> str | None:
    """None when we are not root (the server runs as us); else the unprivileged user, created."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/bin/sh",
                        SERVER_USER], check=True, capture_output=True)
    return SERVER_USER


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start() -> Cluster:
    bindir = _bindir()
    user = _server_user()
    # Not under pytest's basetemp: that is private to us (0700) and the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="colgrid-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(root=root, port=0, bindir=bindir, run_as=user)
    _run_as(user, [str(bindir / "initdb"), "-D", str(cluster.data_dir), "-U", SUPERUSER, "--auth=trust",
                   "--encoding=UTF8", "--no-sync", "--no-instructions"])
    # The port is free when picked, not necessarily when the server binds it: retry a few times.
    for attempt in range(3):
        cluster = Cluster(root=root, port=_free_port(), bindir=bindir, run_as=user)
        options = (f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {root} -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        started = cluster.pg_ctl("start", "-w", "-t", "60", "-l", str(cluster.log_file), "-o", options,
                                 check=False)
        if started.returncode == 0:
            atexit.register(_stop, cluster)
            return cluster
    log = cluster.log_file.read_text() if cluster.log_file.exists() else ""
    shutil.rmtree(root, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL did not start: {started.stdout}\n{started.stderr}\n{log}")


def _stop(cluster: Cluster) -> None:
    cluster.pg_ctl("stop", "-m", "immediate", "-w", check=False)
    shutil.rmtree(cluster.root, ignore_errors=True)


_CLUSTER: list[Cluster] = []
_NAMES = itertools.count(1)
SHARED_DATABASE = "colgrid_tests"


def cluster() -> Cluster:
    """The session's cluster, started on first use (with an empty database SHARED_DATABASE)."""
    if not _CLUSTER:
        server = _start()
        with server.admin() as admin:
            admin.execute(f'CREATE DATABASE "{SHARED_DATABASE}"')
        _CLUSTER.append(server)
    return _CLUSTER[0]


def create_database(**options: str) -> str:
    """A new empty database on the session's cluster; its URL. `options` go to CREATE DATABASE
    (e.g. LOCALE_PROVIDER="icu", ICU_LOCALE="'en-US'", TEMPLATE="template0"). A database costs
    a few hundred milliseconds; `postgres_url` (a schema) a few."""
    server = cluster()
    name = f"colgrid_test_{os.getpid()}_{next(_NAMES)}"
    extra = " ".join(f"{key} {value}" for key, value in options.items())
    with server.admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}" {extra}')
    return server.url(name)


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with cluster().admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """An empty registry location of its own on the session's PostgreSQL server (trust
    authentication, no password): a fresh schema of a shared database, named in the URL as the
    connection's search_path, so everything the registry creates lands in it."""
    server = cluster()
    schema = f"test_{os.getpid()}_{next(_NAMES)}"
    with psycopg.connect(server.url(SHARED_DATABASE), autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{server.url(SHARED_DATABASE)}?options=-csearch_path%3D{schema}"
    with psycopg.connect(server.url(SHARED_DATABASE), autocommit=True) as admin:
        # Connections a test left open (a killed subprocess's) would hold locks on the schema.
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
