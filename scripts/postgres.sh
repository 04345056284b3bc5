#!/usr/bin/env bash
# PostgreSQL server binaries for the registry tests (tests/postgres_server.py starts a throwaway
# cluster from them; nothing here starts a server).
#
#   bash scripts/postgres.sh install   install the server if initdb/pg_ctl are missing (apt, as root)
#   bash scripts/postgres.sh bindir    print the directory holding initdb and pg_ctl, or fail
set -euo pipefail

# The directory with both initdb and pg_ctl: PATH first, then Debian's versioned directories
# (/usr/lib/postgresql/<major>/bin, newest first), which the postgresql package does not put on PATH.
bindir() {
    local initdb pg_ctl dir
    initdb=$(command -v initdb || true)
    pg_ctl=$(command -v pg_ctl || true)
    if [[ -n "$initdb" && -n "$pg_ctl" ]]; then
        dirname "$(readlink -f "$initdb")"
        return 0
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n -r); do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

install() {
    local dir
    if dir=$(bindir); then
        echo "PostgreSQL server binaries found in $dir ($("$dir/postgres" --version))"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "PostgreSQL server binaries (initdb, pg_ctl) are missing and this script can only install" >&2
        echo "them as root with apt-get; install the PostgreSQL server package (e.g. postgresql) yourself." >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends postgresql
    dir=$(bindir) || { echo "installed postgresql, but initdb/pg_ctl are still not found" >&2; return 1; }
    echo "PostgreSQL server binaries installed in $dir ($("$dir/postgres" --version))"
}

case "${1:-}" in
    install) install ;;
    bindir) bindir || { echo "initdb/pg_ctl not found; run: bash scripts/postgres.sh install" >&2; exit 1; } ;;
    *) echo "usage: $0 install|bindir" >&2; exit 2 ;;
esac
