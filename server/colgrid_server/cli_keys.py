"""`colgrid keys ...`: API keys in the server's key file (COLGRID_API_KEYS_FILE or --file).

`create` prints the new key once and stores only its sha256; a running server picks up
created and revoked keys within a second, without a restart.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_keys_verbs(verbs: argparse._SubParsersAction) -> None:
    keys = verbs.add_parser("keys", help="create, list and revoke API keys",
                            description="Manage the API key file the server authenticates callers with.")
    sub = keys.add_subparsers(dest="keys_verb", required=True, metavar="VERB")

    def file_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--file", help="key file (default $COLGRID_API_KEYS_FILE)")

    p = sub.add_parser("create", help="create a key and print it once",
                       description="Create a random API key named NAME with the given roles, store its "
                                   "sha256 in the key file (created if absent) and print the key once. "
                                   "Roles: search (Search*, Encode*), ingest (Ingest), admin (Registry, "
                                   "Rollout, Evaluation); none implies another.")
    p.add_argument("name", help="who the key is for (shown in refusal logs), e.g. search-frontend")
    # Checked by security.check_roles (not argparse choices: keeps grpc out of `colgrid --help`).
    p.add_argument("--role", action="append", required=True, dest="roles", metavar="ROLE",
                   help="search, ingest or admin; repeat for several")
    file_opt(p)
    p.set_defaults(fn=cmd_keys_create)

    p = sub.add_parser("list", help="list key names and roles", description="List key names and roles.")
    file_opt(p)
    p.set_defaults(fn=cmd_keys_list)

    p = sub.add_parser("revoke", help="remove a key", description="Remove the key named NAME.")
    p.add_argument("name")
    file_opt(p)
    p.set_defaults(fn=cmd_keys_revoke)


def _key_file(args: argparse.Namespace) -> Path:
    from colgrid_server.config import Settings
    from colgrid_server.errors import InvalidArgument

    path = Settings.load({"api_keys_file": args.file}).api_keys_file
    if not path:
        raise InvalidArgument("name the key file: --file keys.json or COLGRID_API_KEYS_FILE", field="file")
    return Path(path)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from colgrid_server.security import create_key

    path = _key_file(args)
    key = create_key(path, args.name, args.roles)
    print(key, flush=True)  # alone on stdout, so scripts can capture it
    print(f"created API key {args.name!r} (roles: {', '.join(sorted(set(args.roles)))}) in {path}; "
          f"the key above is not stored anywhere: keep it now", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from colgrid_server.security import read_keys

    path = _key_file(args)
    keys = read_keys(path)
    width = max((len(k.name) for k in keys), default=4)
    print(f"{'name':<{width}}  roles")
    for key in keys:
        print(f"{key.name:<{width}}  {', '.join(sorted(key.roles))}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from colgrid_server.security import revoke_key

    path = _key_file(args)
    revoke_key(path, args.name)
    print(f"revoked API key {args.name!r} in {path}")
    return 0
