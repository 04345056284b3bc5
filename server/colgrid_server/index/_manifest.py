"""manifest.json: the sha256 of every file of a version, written last. Its presence marks a
complete version; a version whose files differ from it in any way is never served."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from colgrid_server.errors import CorruptVersion
from colgrid_server.index._format import MANIFEST_NAME

MANIFEST_FORMAT = "colgrid-version-manifest/1"
_READ_BYTES = 4 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under root except the manifest, as sorted POSIX relative paths."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root (directories too: a rename or a new entry is
    only durable once its directory is)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path) -> str:
    """Hash every file under root, write root/manifest.json durably, return the manifest's sha256."""
    files = {rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size} for rel in list_files(root)}
    body = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True).encode()
    path = root / MANIFEST_NAME
    with open(path, "wb") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(root)
    return hashlib.sha256(body).hexdigest()


def read_manifest(root: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """(files, manifest sha256) or CorruptVersion when the manifest is absent or malformed."""
    path = root / MANIFEST_NAME
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        raise _corrupt(root, "no manifest.json (an incomplete or interrupted build)") from None
    except OSError as exc:
        raise _corrupt(root, f"manifest.json cannot be read ({exc.strerror})") from exc
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(root, "manifest.json is not valid JSON") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise _corrupt(root, f"manifest.json is not a {MANIFEST_FORMAT} manifest")
    for rel, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
            or rel.startswith("/")
            or ".." in rel.split("/")
        ):
            raise _corrupt(root, f"manifest.json has an invalid entry for {rel!r}")
    return files, hashlib.sha256(body).hexdigest()


def verify_files(root: Path, files: dict[str, dict[str, Any]], *, hashes: bool = True) -> None:
    """CorruptVersion naming the first file that is missing, unexpected, resized or (with
    hashes=True) whose content differs from the manifest."""
    present = set(list_files(root))
    listed = set(files)
    if missing := sorted(listed - present):
        raise _corrupt(root, f"file {missing[0]} listed in manifest.json is missing ({len(missing)} missing)")
    if extra := sorted(present - listed):
        raise _corrupt(root, f"file {extra[0]} is not in manifest.json ({len(extra)} unexpected)")
    for rel in sorted(listed):
        entry = files[rel]
        size = (root / rel).stat().st_size
        if size != entry["size"]:
            raise _corrupt(root, f"file {rel} has {size} bytes, manifest.json says {entry['size']}")
        if hashes and sha256_file(root / rel) != entry["sha256"]:
            raise _corrupt(root, f"file {rel} does not match its sha256 in manifest.json")


def _corrupt(root: Path, what: str) -> CorruptVersion:
    return CorruptVersion(f"index version {root}: {what}", version_path=str(root))
