"""Build a new index version end to end: registry BUILDING -> Zarr version -> READY -> (stable).

The registry entry is created first so a crash mid-build leaves a visible BUILDING/FAILED row,
never a READY version without its files; the version directory appears only once complete
(VersionWriter publishes atomically). With object storage the version is built in the local
cache, then published (manifest uploaded last) before the registry records it READY.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from colgrid_registry import Registry
from colgrid_server.documents import Document
from colgrid_server.encoders import encoder_id, ensure_default_encoder, load_any_encoder
from colgrid_server.index import VersionSummary, build_version
from colgrid_server.ingest import SourceError, SourceItem
from colgrid_server.interrupted import builder_identity
from colgrid_server.paths import DataDir
from colgrid_server.storage import LocalStorage, ObjectStorage, VersionStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOutcome:
    index: str
    version: str
    summary: VersionSummary
    activated: bool
    errors: tuple[SourceError, ...] = field(default=())  # inputs refused (source builds only)


def import_encoder(data: DataDir, path: Path) -> Path:
    """The encoder's directory inside the data dir (copied there if it lives elsewhere), so a
    server started on this data dir can always load the encoder its versions pin."""
    path = path.resolve()
    if data.encoders.resolve() in path.parents:
        return path
    ident = encoder_id(path)
    target = data.encoders / f"{path.name}-{ident[:12]}"
    if not target.exists():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(path, tmp)
        tmp.rename(target)
    return target


def resolve_encoder_dir(data: DataDir, encoder_dir: Path | None, *, progress: bool = False) -> Path:
    """The encoder directory inside the data dir: the one given (imported), else the bundled one."""
    return import_encoder(data, encoder_dir) if encoder_dir else ensure_default_encoder(data.root, progress=progress)


def build_index(data: DataDir, registry: Registry, name: str, documents: Iterable[Document], *,
                encoder_dir: Path | None = None, activate: bool = True, batch_size: int = 64,
                build_params: Mapping[str, Any] | None = None, progress: bool = True,
                actor: str = "cli", reason: str = "", storage: VersionStorage | None = None) -> BuildOutcome:
    registry.ensure_index(name)  # validates the name before any work
    encoder = load_any_encoder(resolve_encoder_dir(data, encoder_dir, progress=progress))
    params = {"batch_size": batch_size, **(build_params or {})}

    def write(final_dir: Path) -> tuple[VersionSummary, tuple[SourceError, ...]]:
        return build_version(documents, encoder, final_dir, batch_size=batch_size, build_params=params,
                             progress=progress), ()

    return _registered_build(data, registry, name, encoder, params, write, activate=activate, actor=actor,
                             reason=reason, storage=storage)


def build_index_from_sources(data: DataDir, registry: Registry, name: str,
                             sources: Iterable[SourceItem | SourceError], *, encoder_dir: Path | None = None,
                             encoder: Any = None, activate: bool = True, pool_factor: int = 1,
                             build_params: Mapping[str, Any] | None = None, progress: bool = True,
                             on_error: Callable[[SourceError], None] | None = None,
                             on_progress: Callable[[int, int], None] | None = None,
                             actor: str = "cli", reason: str = "",
                             storage: VersionStorage | None = None) -> BuildOutcome:
    """Build from a mixed stream of text and page images (`ingest.iter_sources`, or the Ingest
    RPC); refused inputs are skipped and reported (on_error, and in BuildOutcome.errors)."""
    from colgrid_server.ingest.build import build_version_from_sources  # torch: only when building

    registry.ensure_index(name)
    if encoder is None:
        encoder = load_any_encoder(resolve_encoder_dir(data, encoder_dir, progress=progress))
    params = dict(build_params or {})

    def write(final_dir: Path) -> tuple[VersionSummary, tuple[SourceError, ...]]:
        report = build_version_from_sources(sources, encoder, final_dir, build_params=params,
                                            pool_factor=pool_factor, on_error=on_error, on_progress=on_progress,
                                            progress=progress)
        return report.summary, report.errors

    return _registered_build(data, registry, name, encoder, {**params, "pool_factor": pool_factor}, write,
                             activate=activate, actor=actor, reason=reason, storage=storage)


def build_index_from_vectors(data: DataDir, registry: Registry, name: str, path: Path, *, normalized: bool,
                             activate: bool = True, build_params: Mapping[str, Any] | None = None,
                             progress: bool = True, actor: str = "cli", reason: str = "",
                             storage: VersionStorage | None = None) -> BuildOutcome:
    """Build from precomputed multi-vectors in files (`index.load_vector_files`: tokens .npy +
    offsets + ids, or one .safetensors). The version records its dim and normalisation and
    that its encoder is external: it is searched with query vectors."""
    from colgrid_server.index import build_version_from_arrays, external_encoder_ref, load_vector_files

    registry.ensure_index(name)
    files = load_vector_files(path)
    encoder = external_encoder_ref(int(files.tokens.shape[1]), normalized)
    params = {**dict(build_params or {}), "vectors": str(path)}

    def write(final_dir: Path) -> tuple[VersionSummary, tuple[SourceError, ...]]:
        return build_version_from_arrays(final_dir, tokens=files.tokens, doc_offsets=files.doc_offsets,
                                         doc_ids=files.doc_ids, metadata=files.metadata, normalized=normalized,
                                         build_params=params, progress=progress), ()

    return _registered_build(data, registry, name, encoder, params, write, activate=activate, actor=actor,
                             reason=reason, storage=storage)


def _registered_build(data: DataDir, registry: Registry, name: str, encoder: Any, params: Mapping[str, Any],
                      write: Callable[[Path], tuple[VersionSummary, tuple[SourceError, ...]]], *,
                      activate: bool, actor: str, reason: str,
                      storage: VersionStorage | None = None) -> BuildOutcome:
    """Registry BUILDING -> files (-> published) -> READY -> (stable); FAILED with the reason if
    writing or publishing fails (and what was stored of it is removed)."""
    storage = storage or LocalStorage(data)
    # The builder's host and pid let a later run tell a killed build from a running one.
    record = registry.allocate_version(name, encoder_id=encoder.id, encoder_kind=encoder.kind,
                                       dim=encoder.dim, storage_uri="",
                                       build_params={**params, "builder": builder_identity()})
    try:
        local_dir = storage.build_dir(name, record.version)
        summary, errors = write(local_dir)
        if isinstance(storage, ObjectStorage) and (encoder_path := getattr(encoder, "path", None)) is not None:
            storage.publish_encoder(Path(encoder_path))  # first: servers elsewhere load the version with it
        uri = storage.publish(local_dir, name, record.version)
    except BaseException as exc:
        _discard(storage, storage.uri_for(name, record.version))
        registry.mark_failed(name, record.version, f"{type(exc).__name__}: {exc}")
        raise
    registry.mark_ready(name, record.version, documents=summary.documents, tokens=summary.tokens,
                        manifest_sha256=summary.manifest_sha256, storage_uri=uri)
    activated = False
    if activate:
        registry.set_stable(name, record.version, actor=actor,
                            reason=reason or f"built {summary.documents} documents")
        activated = True
    return BuildOutcome(index=name, version=record.version, summary=summary, activated=activated, errors=errors)


def _discard(storage: VersionStorage, uri: str) -> None:
    """Best effort: remove what a failed build stored (it has no manifest, or is never READY)."""
    try:
        if storage.remote:
            storage.delete(uri)
    except Exception as exc:  # noqa: BLE001 - the build's own error is the one to raise
        log.warning("could not remove the leftovers of a failed build at %s: %s", uri, exc)
