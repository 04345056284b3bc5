"""One ingest stream's build, on its own thread: uploaded documents in, a registered version out.

The receiving coroutine `put`s each uploaded document into a bounded `DocumentChannel`; the build
thread turns them into sources (text, images, rendered PDF pages: `ingest`), encodes and writes
them (`ingest.build`, or an external-vectors writer), then records the version READY (and
stable, loaded and warmed here first) — or FAILED, with the reason, when anything goes wrong,
the stream is aborted or the caller goes away. Refused documents are reported and skipped.

Uploaded image and PDF bytes are spooled to a file under `<data>/ingest-spool/` only while they
are being read, and the stream's spool directory is removed when the build ends, however it
ends. No grpc or protobuf here: `service.ingest_rpc` converts at the edge.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from colgrid_registry import IndexNotFound, RegistryError, VersionRecord
from colgrid_server.documents import MAX_DOC_ID_CHARS
from colgrid_server.errors import ColgridError, FailedPrecondition, InvalidArgument
from colgrid_server.ingest import IMAGE_SUFFIXES, ErrorCode, SourceError, SourceItem
from colgrid_server.interrupted import builder_identity
from colgrid_server.paths import DataDir
from colgrid_server.serving import ServingState

log = logging.getLogger(__name__)

SPOOL_DIR = "ingest-spool"
# The channel holds at most this many documents and (beyond its first) this many bytes: with
# the build's own batch, a long stream is never all in memory.
CHANNEL_DOCUMENTS = 64
CHANNEL_BYTES = 128 << 20
UNIT_NORM_TOLERANCE = 1e-2  # as the version writer's: fp16 rounding moves a unit norm by ~1e-3
EXTERNAL_KIND = "external"

Stage = Literal["receiving", "encoding", "clustering", "writing", "ready", "failed"]


class IngestCancelled(ColgridError):
    """The caller went away before the stream ended: nothing is published."""

    code = "CANCELLED"


@dataclass(frozen=True)
class IngestPlan:
    """The stream's options, validated, with the server's limits."""

    index: str
    encoder_id: str = ""          # "": the stable version's encoder, else the bundled one
    codec: str = "fp16"
    activate: bool = False        # the index's first version is activated regardless
    pool_factor: int = 1
    external_vectors: bool = False
    pdf_dpi: int = 144
    n_centroids: int = 0          # 0: chosen from the token count
    actor: str = "ingest"
    max_image_pixels: int = 50_000_000
    max_pdf_pages: int = 2_000

    @property
    def build_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"source": "ingest", "codec": self.codec}
        if self.n_centroids:
            params["n_centroids"] = self.n_centroids
        if not self.external_vectors:
            params.update(pool_factor=self.pool_factor, pdf_dpi=self.pdf_dpi)
        return params


@dataclass(frozen=True)
class Upload:
    """One document as the caller sent it. kind "empty": no content was set."""

    id: str
    kind: Literal["text", "image", "pdf", "vectors", "empty"]
    position: int                 # 0-based position among the stream's documents
    text: str | None = None
    data: bytes | None = None
    vectors: np.ndarray | None = field(default=None, compare=False, repr=False)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    filename: str = ""

    @property
    def nbytes(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.vectors is not None:
            return int(self.vectors.nbytes)
        return len(self.text or "")

    @property
    def name(self) -> str:
        """How errors name it: its id, else its file name, else its position."""
        return self.id or self.filename or f"document {self.position}"


@dataclass(frozen=True)
class Progress:
    stage: Stage
    received: int   # inputs produced so far (a PDF counts its pages once rendered)
    encoded: int    # indexed
    failed: int     # refused (reported as errors)
    elapsed_s: float


@dataclass(frozen=True)
class IngestOutcome:
    record: VersionRecord
    activated: bool


class DocumentChannel:
    """Bounded hand-off from the receiving coroutine (`put`, awaits while full) to the build
    thread (`get`, blocks while empty). `abort(exc)` makes both sides raise `exc`."""

    _END = object()

    def __init__(self, loop: asyncio.AbstractEventLoop, *, capacity: int = CHANNEL_DOCUMENTS,
                 max_bytes: int = CHANNEL_BYTES) -> None:
        self._loop = loop
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._items: deque[Any] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._space = asyncio.Event()
        self._failure: BaseException | None = None

    async def put(self, upload: Upload) -> None:
        await self._put(upload, upload.nbytes)

    async def close(self) -> None:
        """No more documents: the thread's iteration ends once it has taken the rest."""
        await self._put(self._END, 0)

    async def _put(self, item: Any, size: int) -> None:
        while True:
            with self._cond:
                if self._failure is not None:
                    raise self._failure
                if not self._items or (len(self._items) < self._capacity and self._bytes + size <= self._max_bytes):
                    self._items.append((item, size))
                    self._bytes += size
                    self._cond.notify_all()
                    return
                self._space.clear()  # under the lock: a `get` after this sets it again
            await self._space.wait()

    def abort(self, exc: BaseException) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = exc
            self._cond.notify_all()
        self._wake_producer()

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def check(self) -> None:
        """Raise the abort reason, if the stream was aborted (the build's checkpoints)."""
        if self._failure is not None:
            raise self._failure

    def get(self) -> Upload | None:
        """The next document; None once the stream ended. Blocks while the channel is empty."""
        with self._cond:
            while not self._items and self._failure is None:
                self._cond.wait()
            if self._failure is not None:
                raise self._failure
            item, size = self._items.popleft()
            self._bytes -= size
        self._wake_producer()
        return None if item is self._END else item

    def __iter__(self) -> Iterator[Upload]:
        while (upload := self.get()) is not None:
            yield upload

    def _wake_producer(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._space.set)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class IngestJob:
    """The build thread of one stream and the progress it publishes (read with `peek`/`take`)."""

    def __init__(self, plan: IngestPlan, state: ServingState, data: DataDir, channel: DocumentChannel,
                 notify: Callable[[], None]) -> None:
        self.plan = plan
        self._state = state
        self._registry = state.registry
        self._data = data
        self._channel = channel
        self._notify = notify
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._progress = Progress("receiving", 0, 0, 0, 0.0)
        self._errors: list[SourceError] = []
        self._spool: Path | None = None
        self._drained = False  # the stream's documents have all been taken
        self._encoded_seen = 0
        self.outcome: IngestOutcome | None = None
        self.error: BaseException | None = None
        self.finished = False
        self._thread = threading.Thread(target=self._run, name=f"colgrid-ingest-{plan.index}", daemon=True)

    # --- the coroutine's side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def abort(self, exc: BaseException) -> None:
        """Stop the build (it raises `exc` at its next checkpoint and records FAILED). Too late
        once the version is being committed: that build completes."""
        self._channel.abort(exc)

    def peek(self) -> tuple[Progress, int]:
        """Progress now and the number of errors not yet taken."""
        with self._lock:
            return replace(self._progress, elapsed_s=self._elapsed()), len(self._errors)

    def take(self) -> tuple[Progress, list[SourceError]]:
        """Progress now and the errors since the last take."""
        with self._lock:
            errors, self._errors = self._errors, []
            return replace(self._progress, elapsed_s=self._elapsed()), errors

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.outcome = self._build()
        except BaseException as exc:  # noqa: BLE001 - reported to the stream, which ends with it
            self.error = exc
            self._channel.abort(exc)  # the receiver stops reading documents nobody will index
            if not isinstance(exc, (ColgridError, RegistryError)):
                log.exception("ingest into %s failed", self.plan.index)
        finally:
            if self._spool is not None:
                shutil.rmtree(self._spool, ignore_errors=True)
            self.finished = True
            self._notify()

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._progress = replace(self._progress, **changes)
        self._notify()

    def _refuse(self, error: SourceError) -> None:
        with self._lock:
            self._errors.append(error)
            self._progress = replace(self._progress, failed=self._progress.failed + 1)
        self._notify()

    def _build(self) -> IngestOutcome:
        plan = self.plan
        if plan.external_vectors:
            self._registry.ensure_index(plan.index)
            return self._build_external()
        encoder = self._resolve_encoder()  # first: a refused encoder leaves no new, empty index behind
        self._registry.ensure_index(plan.index)
        from colgrid_server.ingest.build import build_version_from_sources  # torch: only when building

        def write(final_dir: Path) -> Any:
            report = build_version_from_sources(
                self._sources(encoder), encoder, final_dir, build_params=plan.build_params,
                pool_factor=plan.pool_factor, on_error=self._refuse, on_progress=self._on_progress)
            return report.summary

        return self._registered(encoder.id, encoder.kind, int(encoder.dim), write)

    def _on_progress(self, seen: int, indexed: int) -> None:
        self._channel.check()
        self._encoded_seen = seen
        done = self._drained and seen == self._progress.received  # k-means and writing come next
        self._update(encoded=indexed, **({"stage": "clustering"} if done else {}))

    def _resolve_encoder(self) -> Any:
        """options.encoder_id, else the stable version's encoder, else the bundled default."""
        if self.plan.encoder_id:
            return self._state.find_encoder(self.plan.encoder_id)
        try:
            stable = self._registry.get_rollout(self.plan.index).stable
        except IndexNotFound:  # a new index: the bundled default
            stable = None
        if stable:
            record = self._registry.get_version(self.plan.index, stable)
            if record.encoder_kind == EXTERNAL_KIND:
                raise FailedPrecondition(f"index {self.plan.index!r} serves {stable}, built from external vectors: "
                                         "set external_vectors to add vectors, or name an encoder_id")
            return self._state.find_encoder(record.encoder_id)
        from colgrid_server.encoders import ensure_default_encoder

        catalog = self._state.catalog
        return catalog.get(catalog.register(ensure_default_encoder(self._data.root)))

    def _registered(self, encoder_id: str, encoder_kind: str, dim: int,
                    write: Callable[[Path], Any]) -> IngestOutcome:
        """Registry BUILDING -> files -> READY -> (stable, loaded here first); FAILED with the
        reason if writing fails or the stream is aborted before the commit."""
        plan, registry = self.plan, self._registry
        record = registry.allocate_version(plan.index, encoder_id=encoder_id, encoder_kind=encoder_kind, dim=dim,
                                           storage_uri="",
                                           build_params={**plan.build_params, "builder": builder_identity()})
        # Built where the server's storage wants it (its cache, with object storage), then
        # published there (uploaded, manifest last) before the registry calls it READY.
        storage = self._state.storage
        final_dir = storage.build_dir(plan.index, record.version)
        try:
            summary = write(final_dir)
            self._update(stage="writing")
            self._channel.check()  # the last point an abort (or a vanished caller) stops the build
            uri = storage.publish(final_dir, plan.index, record.version)
            self._channel.check()
            record = registry.mark_ready(plan.index, record.version, documents=summary.documents,
                                         tokens=summary.tokens, manifest_sha256=summary.manifest_sha256,
                                         storage_uri=uri)
        except BaseException as exc:
            shutil.rmtree(final_dir, ignore_errors=True)  # published perhaps, but never recorded READY
            if storage.remote:
                with contextlib.suppress(Exception):  # best effort: the build's own error is raised
                    storage.delete(storage.uri_for(plan.index, record.version))
            registry.mark_failed(plan.index, record.version, f"{type(exc).__name__}: {exc}")
            raise
        activate = plan.activate or not registry.get_rollout(plan.index).stable
        if activate:
            # Loaded, checked and warmed before the pointer moves, so this server answers from
            # it at once (other replicas follow on their next registry poll).
            with self._state.prepared(plan.index, record.version):
                registry.set_stable(plan.index, record.version, actor=plan.actor,
                                    reason=f"ingested {summary.documents} documents")
                self._state.refresh()
        log.info("ingested %s/%s: %d documents, %d tokens%s", plan.index, record.version, summary.documents,
                 summary.tokens, " (stable)" if activate else "")
        return IngestOutcome(record=registry.get_version(plan.index, record.version), activated=activate)

    # --- documents -> sources -------------------------------------------------------------------

    def _sources(self, encoder: Any) -> Iterator[SourceItem | SourceError]:
        from colgrid_server.encoders.loading import encodes_images

        images = encodes_images(encoder)
        uploads: set[str] = set()
        items: set[str] = set()
        for upload in self._channel:
            problem = _id_problem(upload)
            if problem is None and upload.id in uploads:
                problem = _error(upload, ErrorCode.DUPLICATE_ID, "an earlier document in this stream has this id")
            if problem is not None:
                produced: Iterator[SourceItem | SourceError] = iter([problem])
            else:
                uploads.add(upload.id)
                produced = self._convert(upload, images)
            for source in produced:
                if isinstance(source, SourceItem):
                    if source.id in items:
                        source = _error(upload, ErrorCode.DUPLICATE_ID,
                                        "an earlier document in this stream has this id", source.id)
                    else:
                        items.add(source.id)
                self._channel.check()
                self._update(stage="encoding", received=self._progress.received + 1)
                yield source
                del source  # a page image lives only as long as the build keeps it
        self._drained = True
        if self._encoded_seen == self._progress.received:  # the last batch was encoded already
            self._update(stage="clustering")

    def _convert(self, upload: Upload, images: bool) -> Iterator[SourceItem | SourceError]:
        if upload.kind == "text":
            if not (upload.text or "").strip():
                yield _error(upload, ErrorCode.INVALID_DOCUMENT, "has no text")
                return
            metadata = {"source": upload.filename or upload.id, "mime": "text/plain", **upload.metadata}
            yield SourceItem(id=upload.id, kind="text", text=upload.text, image=None,
                             metadata=_with_filename(metadata, upload))
        elif upload.kind in ("image", "pdf"):
            if not images:
                yield _error(upload, ErrorCode.UNSUPPORTED_BY_ENCODER,
                             f"is {'a PDF' if upload.kind == 'pdf' else 'an image'}, but this index's encoder encodes "
                             "text only; ingest with a multimodal encoder_id (ColQwen2, ColPali)")
                return
            yield from self._spooled(upload)
        else:
            yield _error(upload, ErrorCode.INVALID_DOCUMENT, "carries no content: set text, image or pdf")

    def _spooled(self, upload: Upload) -> Iterator[SourceItem | SourceError]:
        """Write the bytes where iter_image / iter_pdf can read them, for as long as they do."""
        from colgrid_server.ingest._images import iter_image
        from colgrid_server.ingest._pdf import iter_pdf

        if self._spool is None:
            root = self._data.root / SPOOL_DIR
            root.mkdir(parents=True, exist_ok=True)
            self._spool = Path(tempfile.mkdtemp(prefix=f"{self.plan.index}-", dir=root))
        suffix = Path(upload.filename).suffix.lower()
        if upload.kind == "pdf":
            suffix = ".pdf"
        elif suffix not in IMAGE_SUFFIXES:
            suffix = ".img"  # Pillow reads the format from the bytes, not the name
        path = self._spool / f"{upload.position:08d}{suffix}"
        path.write_bytes(upload.data or b"")
        rel = upload.filename or upload.id
        try:
            if upload.kind == "pdf":
                produced = iter_pdf(path, upload.id, rel, dpi=self.plan.pdf_dpi, max_pixels=self.plan.max_image_pixels,
                                    max_pages=self.plan.max_pdf_pages)
            else:
                produced = iter_image(path, upload.id, rel, max_pixels=self.plan.max_image_pixels)
            for source in produced:
                if isinstance(source, SourceError):
                    yield _named(source, upload)
                else:
                    yield source.with_metadata(**_merged(source.metadata, upload))
                del source
        finally:
            path.unlink(missing_ok=True)

    # --- bring your own vectors -----------------------------------------------------------------

    def _build_external(self) -> IngestOutcome:
        """Documents carry their vectors (dims and finiteness checked by the receiver). The
        first one decides the version's normalisation: unit rows declare it normalized, and
        later documents must then be unit too."""
        from colgrid_server.index import external_encoder_ref, external_version_writer

        first = self._channel.get()
        if first is None:
            raise InvalidArgument("the stream has no documents: send at least one after the options",
                                  field="documents")
        assert first.vectors is not None  # the receiver refuses anything else in this mode
        dim = int(first.vectors.shape[1])
        norms = np.linalg.norm(first.vectors, axis=1)
        normalized = bool(np.all(np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE))
        ref = external_encoder_ref(dim, normalized)

        def write(final_dir: Path) -> Any:
            indexed = 0
            with external_version_writer(final_dir, dim=dim, normalized=normalized,
                                         build_params=self.plan.build_params) as writer:
                seen: set[str] = set()
                for upload in _chain(first, self._channel):
                    self._update(stage="encoding", received=self._progress.received + 1)
                    problem = _id_problem(upload)
                    if problem is None and upload.id in seen:
                        problem = _error(upload, ErrorCode.DUPLICATE_ID, "an earlier document in this stream has this id")
                    if problem is not None:
                        self._refuse(problem)
                        continue
                    seen.add(upload.id)
                    try:
                        writer.add(upload.id, upload.vectors, metadata=_with_filename(dict(upload.metadata), upload))
                    except InvalidArgument as exc:
                        self._refuse(_error(upload, ErrorCode.INVALID_DOCUMENT, str(exc)))
                        continue
                    indexed += 1
                    self._update(encoded=indexed)
                if indexed == 0:
                    raise InvalidArgument("none of the documents could be indexed", field="documents")
                self._update(stage="clustering")
                return writer.finalize()

        return self._registered(ref.id, ref.kind, ref.dim, write)


def _chain(first: Upload, rest: DocumentChannel) -> Iterator[Upload]:
    yield first
    yield from rest


def _id_problem(upload: Upload) -> SourceError | None:
    if not upload.id.strip():
        return _error(upload, ErrorCode.INVALID_DOCUMENT, "has no id: every document needs one")
    if len(upload.id) > MAX_DOC_ID_CHARS:
        return _error(upload, ErrorCode.INVALID_DOCUMENT, f"its id is longer than {MAX_DOC_ID_CHARS} characters",
                      upload.id[:MAX_DOC_ID_CHARS])
    return None


def _error(upload: Upload, code: ErrorCode, reason: str, doc_id: str | None = None) -> SourceError:
    return SourceError(id=doc_id or upload.name, path=upload.filename or upload.id, reason=reason, code=code)


def _named(error: SourceError, upload: Upload) -> SourceError:
    """A reader's error about the spooled file, told in the caller's terms (not the spool path)."""
    return replace(error, path=upload.filename or upload.id)


# What ingestion measured about a page beats whatever the caller's metadata says about it.
_FACTS = frozenset({"mime", "width_px", "height_px", "page", "page_count", "width_pt", "height_pt", "dpi"})


def _merged(produced: Mapping[str, Any], upload: Upload) -> dict[str, Any]:
    merged = {**produced, **upload.metadata, **{k: v for k, v in produced.items() if k in _FACTS}}
    return _with_filename(merged, upload)


def _with_filename(metadata: dict[str, Any], upload: Upload) -> dict[str, Any]:
    if upload.filename:
        metadata["filename"] = upload.filename
    return metadata
