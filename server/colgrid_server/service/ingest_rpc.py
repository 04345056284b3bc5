"""IngestService: a client-streamed Ingest (options, then documents) answered with streamed
build progress, ending with the READY version.

The coroutine only receives, validates and hands documents over; the build runs on its own
thread (`ingest_job.IngestJob`), fed through a bounded channel so a long stream is never all in
memory. Progress goes out whenever the stage changes or errors are pending, else every
PROGRESS_EVERY inputs or PROGRESS_INTERVAL_S seconds. Refused documents are reported in
progress messages; the stream fails (and the version is FAILED, never READY) when the options
are invalid, a document breaks the stream's rules (vectors without external_vectors, a dim that
changes, more than max_ingest_documents), nothing could be indexed, or the caller cancels.
After an activating ingest this server serves the new version at once (loaded, checked and
warmed before stable moves); other replicas pick it up on their next registry poll
(registry_poll_seconds). If that load check fails, the stream ends FAILED_PRECONDITION naming
the check, and the version stays READY (it was built and verified) without becoming stable.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_registry._names import check_name  # the registry's own rule, checked before any work
from colgrid_server.config import Settings
from colgrid_server.errors import InvalidArgument, ResourceExhausted
from colgrid_server.index import CODECS
from colgrid_server.index._pooling import MAX_POOL_FACTOR
from colgrid_server.ingest import SourceError
from colgrid_server.ingest._sources import MAX_PDF_DPI
from colgrid_server.paths import DataDir
from colgrid_server.serving import ServingState
from colgrid_server.service import convert
from colgrid_server.service.ingest_job import (
    DocumentChannel, IngestCancelled, IngestJob, IngestPlan, Progress, Upload)
from colgrid_server.service.status import abort_with

PROGRESS_EVERY = 64
PROGRESS_INTERVAL_S = 0.5


class IngestService(pb_grpc.IngestServiceServicer):
    def __init__(self, state: ServingState, settings: Settings) -> None:
        self._state = state
        self._settings = settings
        self._data = DataDir(settings.data_dir)

    async def Ingest(self, request_iterator: AsyncIterator[pb.IngestRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.IngestProgress]:
        job: IngestJob | None = None
        receiver: asyncio.Task | None = None
        try:
            plan = _plan(await _first_options(request_iterator), self._settings)
            loop = asyncio.get_running_loop()
            changed = asyncio.Event()

            def notify() -> None:
                try:
                    loop.call_soon_threadsafe(changed.set)
                except RuntimeError:  # the loop closed under a finishing build
                    pass

            channel = DocumentChannel(loop)
            job = IngestJob(plan, self._state, self._data, channel, notify)
            job.start()
            receiver = asyncio.create_task(self._receive(request_iterator, plan, channel))
            async for message in _progress_messages(job, changed):
                yield message
        except Exception as exc:  # noqa: BLE001 - every error becomes a status in one place
            await abort_with(context, exc)
        finally:
            if job is not None and not job.finished:
                job.abort(IngestCancelled("the client cancelled the ingest stream before it ended"))
            if receiver is not None:
                receiver.cancel()

    async def _receive(self, request_iterator: AsyncIterator[pb.IngestRequest], plan: IngestPlan,
                       channel: DocumentChannel) -> None:
        """Documents into the channel, in order; a stream-level problem aborts the build with it."""
        limit = self._settings.max_ingest_documents
        dim: int | None = None
        position = 0
        try:
            async for request in request_iterator:
                item = request.WhichOneof("item")
                if item != "document":
                    raise InvalidArgument(f"request {position + 1} after the options carries "
                                          f"{item or 'nothing'}: send options once, first, then documents",
                                          field="options" if item == "options" else "document")
                if position >= limit:
                    raise ResourceExhausted(f"more than {limit:,} documents in one ingest stream; split them over "
                                            "several streams (versions) or raise COLGRID_MAX_INGEST_DOCUMENTS")
                upload = _upload(request.document, position, plan, dim)
                if upload.vectors is not None:
                    dim = upload.vectors.shape[1]
                await channel.put(upload)
                position += 1
            await channel.close()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the build thread raises it and the stream ends with it
            channel.abort(exc)


async def _progress_messages(job: IngestJob, changed: asyncio.Event) -> AsyncIterator[pb.IngestProgress]:
    loop = asyncio.get_running_loop()
    last: Progress | None = None
    last_at = loop.time()
    while not job.finished:
        try:
            await asyncio.wait_for(changed.wait(), PROGRESS_INTERVAL_S)
        except TimeoutError:
            pass
        changed.clear()
        if job.finished:
            break
        now, pending = job.peek()
        due = (last is None or pending or now.stage != last.stage
               or now.received - last.received >= PROGRESS_EVERY
               or (loop.time() - last_at >= PROGRESS_INTERVAL_S
                   and (now.received, now.encoded, now.failed) != (last.received, last.encoded, last.failed)))
        if due:
            now, errors = job.take()
            yield _message(now, errors)
            last, last_at = now, loop.time()
    now, errors = job.take()
    if job.error is not None or job.outcome is None:
        yield _message(now, errors, stage="failed")
        raise job.error or IngestCancelled("the build ended without a version")
    yield _message(now, errors, stage="ready", version=convert.version(job.outcome.record))


def _message(progress: Progress, errors: list[SourceError], *, stage: str | None = None,
             version: pb.Version | None = None) -> pb.IngestProgress:
    message = pb.IngestProgress(stage=stage or progress.stage, received=progress.received, encoded=progress.encoded,
                                failed=progress.failed, elapsed_s=progress.elapsed_s,
                                errors=[_ingest_error(e) for e in errors])
    if version is not None:
        message.version.CopyFrom(version)
    return message


def _ingest_error(error: SourceError) -> pb.IngestError:
    where = f"{error.path}: " if error.path and error.path != error.id else ""
    return pb.IngestError(document=error.id, code=str(error.code), message=f"{where}{error.reason}")


# --- requests -> domain ------------------------------------------------------------------------

async def _first_options(request_iterator: AsyncIterator[pb.IngestRequest]) -> pb.IngestOptions:
    async for request in request_iterator:
        if request.WhichOneof("item") != "options":
            raise InvalidArgument("the first message of an ingest stream must be options (index, encoder, "
                                  "codec, ...); documents follow it", field="options")
        return request.options
    raise InvalidArgument("the ingest stream ended before its options: send options, then documents",
                          field="options")


def _plan(options: pb.IngestOptions, settings: Settings) -> IngestPlan:
    index = options.index
    if not index:
        raise InvalidArgument("options.index is required: name the index to build a version of (created if new)",
                              field="options.index")
    try:
        check_name(index, kind="index")
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="options.index") from exc
    codec = options.codec or "fp16"
    if codec not in CODECS:
        raise InvalidArgument(f"codec {codec!r} is not one of {', '.join(CODECS)}", field="options.codec")
    pool_factor = options.pool_factor or 1
    if pool_factor > MAX_POOL_FACTOR:
        raise InvalidArgument(f"pool_factor must be 1..{MAX_POOL_FACTOR} (0 or 1: no pooling), got {pool_factor}",
                              field="options.pool_factor")
    dpi = options.pdf_dpi or settings.pdf_dpi
    if dpi > MAX_PDF_DPI:
        raise InvalidArgument(f"pdf_dpi must be 1..{MAX_PDF_DPI} (0: the server's {settings.pdf_dpi}), got {dpi}",
                              field="options.pdf_dpi")
    if options.external_vectors and options.encoder_id:
        raise InvalidArgument("external_vectors and encoder_id exclude each other: vectors computed elsewhere "
                              "have no encoder here", field="options.encoder_id")
    return IngestPlan(index=index, encoder_id=options.encoder_id, codec=codec, activate=options.activate,
                      pool_factor=pool_factor, external_vectors=options.external_vectors, pdf_dpi=dpi,
                      n_centroids=options.n_centroids, actor=options.actor or "ingest",
                      max_image_pixels=settings.max_image_pixels, max_pdf_pages=settings.max_pdf_pages)


def _upload(document: pb.IngestDocument, position: int, plan: IngestPlan, dim: int | None) -> Upload:
    """The domain value of one document. Vectors break the stream's rules, not just their
    document's, when they do not fit the mode or the stream's dim."""
    field = f"documents[{position}]"
    kind = document.WhichOneof("content") or "empty"
    name = document.id or document.filename or field
    if plan.external_vectors and kind != "vectors":
        raise InvalidArgument(f"document {name!r} carries {kind if kind != 'empty' else 'no content'}, but "
                              "options.external_vectors is set: every document must carry vectors",
                              field=f"{field}.vectors")
    if not plan.external_vectors and kind == "vectors":
        raise InvalidArgument(f"document {name!r} carries vectors: set options.external_vectors to ingest "
                              "precomputed vectors (they cannot mix with text, images or PDFs)",
                              field="options.external_vectors")
    vectors = None
    if kind == "vectors":
        got = document.vectors.dim
        if dim is not None and got != dim:
            raise InvalidArgument(f"document {name!r} has vectors of dim {got}; the stream's first document set "
                                  f"dim {dim}", field=f"{field}.vectors.dim")
        vectors = convert.matrix_from_pb(document.vectors, field=f"{field}.vectors", expected_dim=got)
    return Upload(id=document.id, kind=kind, position=position,
                  text=document.text if kind == "text" else None,
                  data=getattr(document, kind) if kind in ("image", "pdf") else None, vectors=vectors,
                  metadata=_plain(json_format.MessageToDict(document.metadata)) if document.HasField("metadata")
                  else {}, filename=document.filename)


def _plain(value: Any) -> Any:
    """Struct numbers are doubles: give back the integers (`page: 3`) they were."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value
