"""API keys: a JSON file listing {name, key_sha256, roles}. Only the sha256 of a key is ever
stored; the key itself is printed once, when it is created.

    [{"name": "search-frontend", "key_sha256": "<64 hex>", "roles": ["search"]}, ...]
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from colgrid_server.errors import FailedPrecondition, InvalidArgument, NotFound
from colgrid_server.security._roles import ROLES

log = logging.getLogger(__name__)
# A recognisable prefix lets secret scanners (and people) tell a colgrid key from other tokens.
KEY_PREFIX = "cgk_"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True)
class ApiKey:
    """One key as stored: who it is for, the sha256 hex of the key, what it may call."""

    name: str
    key_sha256: str
    roles: frozenset[str]

    def as_json(self) -> dict:
        return {"name": self.name, "key_sha256": self.key_sha256, "roles": sorted(self.roles)}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)  # 256 random bits


def check_roles(roles: Iterable[str], *, where: str = "roles") -> frozenset[str]:
    chosen = frozenset(roles)
    if not chosen:
        raise InvalidArgument(f"{where}: give at least one role ({', '.join(ROLES)})", field="roles")
    unknown = sorted(chosen - set(ROLES))
    if unknown:
        raise InvalidArgument(f"{where}: unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}",
                              field="roles")
    return chosen


def parse_keys(text: str, *, source: str) -> tuple[ApiKey, ...]:
    """The keys of a key file's contents; InvalidArgument names the entry that is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{source} is not valid JSON: {exc}", field="api_keys_file") from exc
    if not isinstance(raw, list):
        raise InvalidArgument(f"{source} must hold a JSON list of {{name, key_sha256, roles}}",
                              field="api_keys_file")
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{source} entry {i}"
        if not isinstance(entry, dict) or not {"name", "key_sha256", "roles"} <= entry.keys():
            raise InvalidArgument(f"{where} must be an object with name, key_sha256 and roles",
                                  field="api_keys_file")
        name, digest, roles = entry["name"], entry["key_sha256"], entry["roles"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgument(f"{where}: name {name!r} must be 1-64 of A-Z a-z 0-9 . _ @ -",
                                  field="api_keys_file")
        if name in seen:
            raise InvalidArgument(f"{where}: the name {name!r} is used twice", field="api_keys_file")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise InvalidArgument(f"{where} ({name}): key_sha256 must be 64 lowercase hex digits "
                                  f"(the sha256 of the key, never the key itself)", field="api_keys_file")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidArgument(f"{where} ({name}): roles must be a list of strings", field="api_keys_file")
        seen.add(name)
        keys.append(ApiKey(name, digest, check_roles(roles, where=f"{where} ({name})")))
    return tuple(keys)


def read_keys(path: Path) -> tuple[ApiKey, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FailedPrecondition(f"cannot read the API key file {path}: {exc.strerror or exc}; "
                                 f"create it with `colgrid keys create NAME --role search --file {path}`") from exc
    return parse_keys(text, source=str(path))


def write_keys(path: Path, keys: Iterable[ApiKey]) -> None:
    """Replace the file atomically (readers see the old or the new list), owner-only."""
    body = json.dumps([k.as_json() for k in keys], indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(path: Path, name: str, roles: Iterable[str]) -> str:
    """Add a new random key named `name` to the file (created if absent); returns the key,
    which is stored nowhere: show it once."""
    keys = read_keys(path) if path.exists() else ()
    if any(k.name == name for k in keys):
        raise InvalidArgument(f"{path} already has a key named {name!r}; revoke it first or pick another name",
                              field="name")
    key = new_key()
    entry = ApiKey(name, hash_key(key), check_roles(roles))
    parse_keys(json.dumps([entry.as_json()]), source="new key")  # same rules as the server applies
    write_keys(path, (*keys, entry))
    return key


def revoke_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    if not any(k.name == name for k in keys):
        raise NotFound(f"{path} has no key named {name!r}", resource_type="api-key", resource_name=name)
    write_keys(path, tuple(k for k in keys if k.name != name))


class KeyStore:
    """The keys of one file, re-read when the file changes (checked at most every `recheck_s`),
    so keys are added and revoked without a restart. A change that makes the file unreadable or
    invalid is logged and the last good keys stay in force."""

    def __init__(self, path: Path, *, recheck_s: float = 1.0) -> None:
        self._path = path
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._keys = read_keys(path)  # at start-up a bad file is an error, not a warning
        self._stamp = self._stat()
        self._checked = time.monotonic()

    @property
    def path(self) -> Path:
        return self._path

    def keys(self) -> tuple[ApiKey, ...]:
        self._maybe_reload()
        return self._keys

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash matches `presented`. Every stored hash is compared, in constant
        time each, so timing tells nothing about how close a guess came."""
        digest = hash_key(presented)
        found = None
        for key in self.keys():
            if hmac.compare_digest(digest, key.key_sha256):
                found = key
        return found

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._recheck_s:
            return
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self._keys = read_keys(self._path)
            except (InvalidArgument, FailedPrecondition) as exc:
                log.error("API key file changed but cannot be used; keeping the previous %d key(s): %s",
                          len(self._keys), exc)
                return
            log.info("API key file %s reloaded: %d key(s)", self._path, len(self._keys))
