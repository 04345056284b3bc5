"""One loaded index version with its encoder, counted leases, and the checks it passes to load.

A version is unloaded only once nothing uses it: every request (and every stream) holds a
lease while it reads the version; `retire()` stops nothing by itself, it only makes the last
`release()` close the arrays. So a rollout never pulls a version from under a running search.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colgrid_registry import VersionRecord, VersionState
from colgrid_server.errors import ColgridError, FailedPrecondition
from colgrid_server.index import EncoderRef, LoadedVersion, is_external, open_version
from colgrid_server.observability import _tracing as tracing
from colgrid_server.search import DocumentFilter, SearchParams, SearchResult, Searcher
from colgrid_server.storage import VersionStorage, open_stored

# The checks a version passes before traffic may reach it, in the order they run.
CHECKS = ("ready", "checksum", "encoder", "warm-up")
WARM_UP_QUERY = "warm up the index"


class VersionCheckFailed(FailedPrecondition):
    """A version failed one of CHECKS: it must not receive traffic. `check` names which one."""

    code = "VERSION_CHECK_FAILED"

    def __init__(self, index: str, version: str, check: str, detail: str, *, version_path: str = "") -> None:
        super().__init__(f"{index}/{version} failed the {check!r} check: {detail}")
        self.index = index
        self.version = version
        self.check = check
        self.version_path = version_path


@dataclass(frozen=True)
class Query:
    """One search as the domain sees it: text for the answering version's encoder, or vectors
    computed elsewhere (their dim must match that encoder's)."""

    params: SearchParams
    text: str | None = None
    vectors: np.ndarray | None = field(default=None, compare=False, repr=False)
    exhaustive: bool = False
    where: DocumentFilter | None = None  # only documents it permits


@dataclass(frozen=True)
class Answer:
    result: SearchResult
    encode_ms: float
    total_ms: float

    @property
    def doc_ids(self) -> list[str]:
        return [h.doc_id for h in self.result.hits]


class ServedVersion:
    """A version held in memory for serving: arrays, searcher and the encoder it pins."""

    def __init__(self, record: VersionRecord, loaded: LoadedVersion, encoder: Any) -> None:
        self.index = record.index
        self.version = record.version
        self.record = record
        self.loaded = loaded
        self.encoder = encoder
        self.searcher = Searcher(loaded)
        self.loaded_at = time.time()
        self._lock = threading.Lock()
        self._leases = 0
        self._retired = False

    @property
    def encoder_id(self) -> str:
        return self.loaded.encoder.id

    @property
    def key(self) -> tuple[str, str]:
        return (self.index, self.version)

    # --- leases ---------------------------------------------------------------------------------

    def acquire(self) -> Lease | None:
        """A lease, or None once the version is closed (the caller re-reads the snapshot: a
        version is closed only after a snapshot without it was published)."""
        with self._lock:
            if self.loaded.closed:
                return None
            self._leases += 1
        return Lease(self)

    def _release(self) -> None:
        with self._lock:
            self._leases -= 1
            close = self._retired and self._leases == 0
        if close:
            self._close()

    def retire(self) -> None:
        """No snapshot references this version any more: close it when its last lease ends."""
        with self._lock:
            self._retired = True
            close = self._leases == 0
        if close:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self.loaded.closed or self._leases:
                return
            self.searcher.close()
            self.loaded.close()

    @property
    def in_flight(self) -> int:
        return self._leases

    @property
    def retired(self) -> bool:
        return self._retired

    @property
    def closed(self) -> bool:
        return self.loaded.closed

    # --- search ---------------------------------------------------------------------------------

    def search(self, query: Query) -> Answer:
        """Encode (text) with this version's encoder, then search this version only."""
        started = time.perf_counter()
        where = {"index": self.index, "version": self.version}
        if query.vectors is not None:
            vectors: np.ndarray = query.vectors
            tokens: Sequence[str] = [f"q{i}" for i in range(vectors.shape[0])]
        else:
            with tracing.span("encode query", **where, encoder=self.encoder_id[:16]):
                encoded = self.encoder.encode_queries([query.text])[0]
            vectors, tokens = encoded.vectors, encoded.tokens
        encode_ms = (time.perf_counter() - started) * 1000
        run = self.searcher.exhaustive if query.exhaustive else self.searcher.search
        with tracing.span("search", **where, exhaustive=query.exhaustive, k=query.params.k, nprobe=query.params.nprobe,
                          n_candidates=query.params.n_candidates) as span:
            search_started = tracing.now_ns()
            result = run(vectors, tokens, query.params, query.where)
            if span is not None:
                span.set_attribute("colgrid.filtered", query.where is not None)
                stats = result.stats
                span.set_attribute("colgrid.candidates", stats.candidates)
                span.set_attribute("colgrid.query_tokens", stats.query_tokens)
                tracing.stage_spans([("candidates", stats.candidates_ms), ("maxsim", stats.maxsim_ms)],
                                    search_started, **where)
        return Answer(result=result, encode_ms=encode_ms, total_ms=(time.perf_counter() - started) * 1000)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "retired" if self._retired else "live"
        return f"ServedVersion({self.index}/{self.version}, {state}, in_flight={self._leases})"


class Lease:
    """The right to read one version until `release()` (idempotent)."""

    __slots__ = ("version", "_released", "_lock")

    def __init__(self, version: ServedVersion) -> None:
        self.version = version
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.version._release()

    def __enter__(self) -> ServedVersion:
        return self.version

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def load_version(record: VersionRecord, catalog: Any, *, device: str | None = None,
                 storage: VersionStorage | None = None, screen: bool = False) -> ServedVersion:
    """Run every check in CHECKS, then return the version ready to serve (warmed with one query).
    Raises VersionCheckFailed naming the first check that failed. `storage` fetches a version on
    object storage into its local cache first (None: storage_uri is a local directory)."""
    index, version = record.index, record.version
    check_ready(record)
    try:
        if storage is None:
            loaded = open_version(Path(record.storage_uri), verify=True, device=device, screen=screen)
        else:
            loaded = open_stored(storage, record.storage_uri, manifest_sha256=record.manifest_sha256, device=device,
                                 screen=screen)
    except ColgridError as exc:  # CorruptVersion, files missing altogether, object storage unreachable
        raise VersionCheckFailed(index, version, "checksum", str(exc), version_path=record.storage_uri) from exc
    try:
        if record.manifest_sha256 and loaded.manifest_sha256 != record.manifest_sha256:
            raise VersionCheckFailed(index, version, "checksum",
                                     f"the manifest on disk ({loaded.manifest_sha256[:12]}…) is not the one the "
                                     f"registry recorded ({record.manifest_sha256[:12]}…)",
                                     version_path=record.storage_uri)
        served = ServedVersion(record, loaded, _encoder(record, loaded, catalog))
        _warm_up(served)
        return served
    except BaseException:
        loaded.close()
        raise


def check_ready(record: VersionRecord) -> None:
    """The "ready" check: the registry says READY and knows where the files are."""
    if record.state is not VersionState.READY:
        raise VersionCheckFailed(record.index, record.version, "ready",
                                 f"the registry has it {record.state.value}, not READY")
    if not record.storage_uri:
        raise VersionCheckFailed(record.index, record.version, "ready", "the registry has no storage location for it")


class ExternalVectors:
    """Stands in for the encoder of a version built from external vectors: it has the version's
    dim (query vectors are checked against it) and refuses to encode text."""

    def __init__(self, ref: EncoderRef, index: str, version: str) -> None:
        self.id, self.kind, self.dim = ref.id, ref.kind, ref.dim
        self._label = f"{index}/{version}"

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise FailedPrecondition(f"version {self._label} was built from external vectors; "
                                 "search it with query_vectors")

    encode_queries = encode_documents = _refuse


def _encoder(record: VersionRecord, loaded: LoadedVersion, catalog: Any) -> Any:
    index, version, ref = record.index, record.version, loaded.encoder
    if record.encoder_id and record.encoder_id != ref.id:
        raise VersionCheckFailed(index, version, "encoder", f"the registry pins encoder {record.encoder_id[:16]}… "
                                                            f"but the files were built with {ref.id[:16]}…")
    if is_external(ref):  # no encoder to load: only query vectors can search it
        return ExternalVectors(ref, index, version)
    try:
        encoder = catalog.get(ref.id)
    except ColgridError as exc:
        raise VersionCheckFailed(index, version, "encoder", f"cannot load encoder {ref.id[:16]}…: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - ORT/tokenizers raise their own types on bad files
        raise VersionCheckFailed(index, version, "encoder",
                                 f"cannot load encoder {ref.id[:16]}…: {type(exc).__name__}: {exc}") from exc
    if encoder.dim != ref.dim:
        raise VersionCheckFailed(index, version, "encoder", f"encoder {ref.id[:16]}… produces dim {encoder.dim}; "
                                                            f"the version stores dim {ref.dim}")
    return encoder


def _warm_up(served: ServedVersion) -> None:
    """One real query end to end, so the first user request pays no lazy initialisation and a
    version that cannot answer never receives traffic."""
    try:
        if isinstance(served.encoder, ExternalVectors):  # a random unit query of the version's dim
            vectors = np.random.default_rng(0).standard_normal((4, served.encoder.dim)).astype(np.float32)
            query = Query(params=SearchParams(k=1), vectors=vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        else:
            query = Query(params=SearchParams(k=1), text=WARM_UP_QUERY)
        served.search(query)
    except Exception as exc:  # noqa: BLE001 - any failure here means: do not route to it
        raise VersionCheckFailed(served.index, served.version, "warm-up",
                                 f"a test query failed: {type(exc).__name__}: {exc}") from exc
