"""The contract every version store meets, and the names shared by its backends."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from colgrid_server.errors import ColgridError, FailedPrecondition

# Under a store's root, versions live where they do under a data dir: indexes/<index>/<version>.
INDEXES_PREFIX = "indexes"
HINT = "check AWS_ENDPOINT_URL, the credentials and that the bucket exists"


class StorageUnavailable(FailedPrecondition):
    """Object storage could not be reached or refused the request (endpoint, credentials, bucket)."""

    code = "STORAGE_UNAVAILABLE"

    def __init__(self, message: str, *, version_path: str = "") -> None:
        super().__init__(message)
        self.version_path = version_path


def is_remote_uri(uri: str) -> bool:
    """True for an object-storage URI (s3://bucket/key, ...); False for a local path."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.lower() not in ("", "file", "local")


@runtime_checkable
class VersionStorage(Protocol):
    """Where published index versions live. Builders write a version into `build_dir` (a local
    directory: the version writer's atomic rename happens there), then `publish` it; servers
    `fetch` a URI to a local directory they open (never reading remote objects per query)."""

    remote: bool  # capability flag: True when versions live outside this machine

    def uri_for(self, index: str, version: str) -> str:
        """Where `publish` puts this version (what the registry records as its storage_uri)."""
        ...

    def build_dir(self, index: str, version: str) -> Path:
        """The local directory a builder writes the version into before publishing it."""
        ...

    def publish(self, local_dir: Path, index: str, version: str) -> str:
        """Make the complete version in local_dir (manifest.json present) available at
        uri_for(index, version), manifest last; return that URI."""
        ...

    def fetch(self, uri: str, *, manifest_sha256: str | None = None, refresh: bool = False) -> Path:
        """A local directory holding the complete version at `uri`. manifest_sha256: the
        manifest the registry recorded (a copy with another is replaced or refused);
        refresh: discard any local copy first."""
        ...

    def verify(self, uri: str) -> str:
        """Check every file against the manifest; the manifest's sha256, or CorruptVersion."""
        ...

    def has_files(self, uri: str) -> bool:
        """Whether anything is stored at `uri` (a complete version or an interrupted one)."""
        ...

    def delete(self, uri: str) -> None:
        """Remove the version (manifest first, so a half-deleted version is never complete)."""
        ...


@contextmanager
def remote_errors(uri: str, action: str) -> Iterator[None]:
    """Anything the filesystem raises (network, credentials, throttling) as StorageUnavailable;
    colgrid's own errors pass through."""
    try:
        yield
    except ColgridError:
        raise
    except FileNotFoundError as exc:
        raise StorageUnavailable(f"object storage: cannot {action} {uri}: {exc}; {HINT}", version_path=uri) from exc
    except Exception as exc:  # noqa: BLE001 - s3fs/botocore raise many types; callers see one
        raise StorageUnavailable(f"object storage: cannot {action} {uri}: {type(exc).__name__}: {exc}; {HINT}",
                                 version_path=uri) from exc


def check_object(rel: str, entry: Mapping[str, Any], size: int, digest: Callable[[], str],
                 corrupt: Callable[[str], Exception]) -> None:
    """An object against its manifest entry: size first, then (only if that matched) sha256."""
    if size != entry["size"]:
        raise corrupt(f"object {rel} has {size} bytes, manifest.json says {entry['size']}")
    if digest() != entry["sha256"]:
        raise corrupt(f"object {rel} does not match its sha256 in manifest.json")


def get_checked(fs: Any, remote: str, target: Path, rel: str, entry: Mapping[str, Any],
                corrupt: Callable[[str], Exception]) -> None:
    """Download one object listed in a manifest to `target` and check it against its entry."""
    from colgrid_server.index._manifest import sha256_file

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(remote, str(target))
    except FileNotFoundError:
        raise corrupt(f"object {rel} listed in manifest.json is missing") from None
    check_object(rel, entry, target.stat().st_size, lambda: sha256_file(target), corrupt)
