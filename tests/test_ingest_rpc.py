"""The Ingest RPC end to end: a real server on loopback, the SDK's `Client.ingest`, real encoders
(bundled MiniLM, a tiny random ColQwen2), real PDFs and images; the registry and the data dir
are inspected afterwards."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from colgrid_client import (
    AsyncClient, Client, FailedPreconditionError, IngestDoc, IngestProgress, InvalidArgumentError, NotFoundError,
    ResourceExhaustedError, VersionState,
)
from colgrid_client._pb import colgrid_pb2 as pb
from colgrid_client._pb import colgrid_pb2_grpc as pb_grpc
from colgrid_server.builder import import_encoder
from colgrid_server.encoders import encoder_id
from colgrid_server.paths import DataDir
from colgrid_server.service.ingest_job import SPOOL_DIR, DocumentChannel, Upload
from tests.conftest import LiveServer, start_live_server, stop_live_server
from tests.documents_gen import (
    chart_image, png_bytes, png_header_only, write_encrypted_pdf, write_report_pdf, write_zero_page_pdf,
)

STAGES = ("receiving", "encoding", "clustering", "writing", "ready")
SMALL_BUILD = {"n_centroids": 8}  # a few dozen tokens: keep k-means trivial


def _data_dir_with_encoders(root: Path, bundled: Path, colqwen2_dir: Path) -> Path:
    """The bundled MiniLM linked in (not copied), the tiny ColQwen2 imported as a server would."""
    (root / "encoders").mkdir(parents=True)
    (root / "encoders" / bundled.name).symlink_to(bundled, target_is_directory=True)
    import_encoder(DataDir(root), colqwen2_dir)
    return root


@pytest.fixture(scope="module")
def tiny_colqwen2_dir(tmp_path_factory) -> Path:
    """A tiny random ColQwen2 exported to ONNX (conftest's colqwen2_encoder_dir reads a report
    attribute the export no longer has)."""
    from colgrid_server.encoders import export_colqwen2
    from colgrid_server.encoders.tiny_models import build_tiny_colqwen2

    root = tmp_path_factory.mktemp("tiny-colqwen2")
    return export_colqwen2(build_tiny_colqwen2(root / "ckpt", seed=0), root / "encoder", progress=False).path


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder_dir, tiny_colqwen2_dir) -> Iterator[LiveServer]:
    data = _data_dir_with_encoders(tmp_path_factory.mktemp("ingest"), encoder_dir, tiny_colqwen2_dir)
    live, thread = start_live_server(data)
    yield live
    stop_live_server(live, thread)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, encoder_dir, tiny_colqwen2_dir) -> Iterator[LiveServer]:
    """A server that takes at most 3 documents per ingest stream and PDFs of 2 pages at most."""
    data = _data_dir_with_encoders(tmp_path_factory.mktemp("ingest-small"), encoder_dir, tiny_colqwen2_dir)
    live, thread = start_live_server(data, max_ingest_documents=3, max_pdf_pages=2)
    yield live
    stop_live_server(live, thread)


@pytest.fixture()
def client(server: LiveServer) -> Iterator[Client]:
    with Client(server.target, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def colqwen2_id(tiny_colqwen2_dir: Path) -> str:
    return encoder_id(tiny_colqwen2_dir)


@pytest.fixture(scope="module")
def report_pdf(tmp_path_factory) -> bytes:
    return write_report_pdf(tmp_path_factory.mktemp("pdf") / "report.pdf").read_bytes()


def _texts(n: int, prefix: str = "d") -> list[IngestDoc]:
    topics = ["cats and kittens", "tax law for small firms", "rocket engine nozzles", "baking sourdough bread",
              "tide pools on rocky shores"]
    return [IngestDoc.text(f"{prefix}{i}", f"note {i} about {topics[i % len(topics)]}") for i in range(n)]


def _states(client: Client, index: str) -> list[VersionState]:
    try:
        return [v.state for v in client.list_versions(index)]
    except NotFoundError:  # the stream ended before the index was created
        return []


def _leftovers(data_dir: Path, index: str) -> list[Path]:
    """Spooled uploads and unpublished version directories."""
    spool = list((data_dir / SPOOL_DIR).glob("*"))
    index_dir = data_dir / "indexes" / index
    staged = list(index_dir.glob(".*")) if index_dir.is_dir() else []
    return spool + staged


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# --- text ----------------------------------------------------------------------------------------

def test_text_documents_ingested_with_the_bundled_encoder_are_searchable_at_once(client: Client) -> None:
    result = client.ingest("notes", _texts(5), n_centroids=8)
    assert (result.version.index, result.version.state, result.version.documents) == ("notes", VersionState.READY, 5)
    assert result.version.encoder_kind == "colbert" and result.errors == ()
    hits = client.search("notes", "rocket nozzles", k=2)
    assert hits.version == result.version.version  # served by this server without waiting for a poll
    assert hits[0].doc_id == "d2"


def test_documents_given_as_dicts_keep_their_metadata_and_filename(client: Client) -> None:
    client.ingest("dicts", [{"id": "a", "text": "the lighthouse keeper's log", "metadata": {"page": 3, "tag": "x"},
                             "filename": "log.txt"},
                            {"id": "b", "text": "a recipe for plum jam"}], n_centroids=4)
    hit = client.search("dicts", "lighthouse", k=1)[0]
    assert hit.doc_id == "a"
    assert (hit.metadata["page"], hit.metadata["tag"], hit.metadata["filename"]) == (3, "x", "log.txt")


def test_progress_messages_arrive_in_stage_order_and_their_counts_add_up(client: Client) -> None:
    seen: list[IngestProgress] = []
    docs = _texts(70) + [IngestDoc.text("blank", "   "), IngestDoc.text("d0", "a duplicate id")]
    result = client.ingest("progress", docs, n_centroids=8, on_progress=seen.append)
    stages = [STAGES.index(p.stage) for p in seen]
    assert stages == sorted(stages) and seen[-1].stage == "ready" and seen[-1].version is not None
    for before, after in zip(seen, seen[1:]):
        assert (after.received, after.encoded, after.failed) >= (before.received, before.encoded, before.failed)
        assert after.received >= before.received and after.encoded >= before.encoded and after.failed >= before.failed
    assert (result.received, result.encoded, result.failed) == (72, 70, 2)
    assert result.received == result.encoded + result.failed
    assert sum(len(p.errors) for p in seen) == result.failed == len(result.errors)
    assert result.progress_messages == len(seen) >= 3


def test_a_second_ingest_becomes_stable_only_when_activated(client: Client) -> None:
    first = client.ingest("cutover", _texts(3), n_centroids=4)
    second = client.ingest("cutover", _texts(3, prefix="e"), n_centroids=4)
    assert client.get_rollout("cutover").rollout.stable == first.version.version
    assert client.search("cutover", "tax law", k=1)[0].doc_id == "d1"
    third = client.ingest("cutover", _texts(3, prefix="f"), n_centroids=4, activate=True)
    assert client.get_rollout("cutover").rollout.stable == third.version.version != second.version.version
    assert client.search("cutover", "tax law", k=1)[0].doc_id == "f1"


def test_an_image_for_a_text_only_encoder_is_refused_and_the_text_indexed(client: Client) -> None:
    result = client.ingest("text-only", [IngestDoc.text("t", "a chart of revenue"),
                                         IngestDoc.image("chart", png_bytes(chart_image(64, 48)))], n_centroids=4)
    assert [(e.document, e.code) for e in result.errors] == [("chart", "unsupported_by_encoder")]
    assert result.version.documents == 1


def test_the_async_client_ingests_too(server: LiveServer) -> None:
    async def run():
        async with AsyncClient(server.target, timeout=120, retries=0) as client:
            async def documents():
                for doc in _texts(3):
                    yield doc
            return await client.ingest("async-notes", documents(), n_centroids=4)

    result = asyncio.run(run())
    assert (result.version.state, result.encoded) == (VersionState.READY, 3)


# --- images and PDFs -------------------------------------------------------------------------------

def test_mixed_ingest_indexes_text_images_and_pdf_pages_whose_patch_boxes_lie_on_the_page(
        client: Client, colqwen2_id: str, mixed_sources_dir: Path) -> None:
    docs = [IngestDoc.file(mixed_sources_dir / name) for name in
            ("notes.txt", "readme.md", "chart.png", "photo.jpg", "report.pdf")]
    result = client.ingest("mixed", docs, encoder_id=colqwen2_id, pdf_dpi=36, n_centroids=16)
    assert result.errors == () and result.received == result.encoded == 7  # 2 texts, 2 images, 3 pages
    answer = client.search("mixed", "Quarterly profit margins chart", k=10, explain=True, exhaustive=True)
    assert {h.doc_id for h in answer} == {"notes.txt", "readme.md", "chart.png", "photo.jpg", "report.pdf#p1",
                                          "report.pdf#p2", "report.pdf#p3"}
    images = [h for h in answer if h.kind == "image"]
    assert len(images) == 5
    for hit in images:
        width, height = hit.metadata["width_px"], hit.metadata["height_px"]
        boxes = [m.patch.box for m in hit.explanation if m.patch is not None]
        assert boxes, hit.doc_id
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (hit.doc_id, (x0, y0, x1, y1), width, height)
    page = next(h for h in images if h.doc_id == "report.pdf#p3")
    assert (page.metadata["page"], page.metadata["page_count"], page.metadata["filename"]) == (3, 3, "report.pdf")


def test_bad_documents_are_each_reported_with_a_code_and_the_rest_is_indexed(
        client: Client, colqwen2_id: str, report_pdf: bytes, tmp_path: Path) -> None:
    encrypted = write_encrypted_pdf(write_report_pdf(tmp_path / "plain.pdf"), tmp_path / "locked.pdf").read_bytes()
    gif = tmp_path / "a.gif"
    chart_image(32, 32).save(gif, "GIF")
    docs = [
        IngestDoc.text("good-text", "revenue by month"),
        IngestDoc.image("good-image", png_bytes(chart_image(64, 48))),
        IngestDoc.image("corrupt", b"\x89PNG\r\n\x1a\n this is not an image", filename="corrupt.png"),
        IngestDoc.pdf("truncated", report_pdf[: len(report_pdf) // 2], filename="cut.pdf"),
        IngestDoc.pdf("encrypted", encrypted),
        IngestDoc.pdf("empty", write_zero_page_pdf(tmp_path / "empty.pdf").read_bytes()),
        IngestDoc.image("huge", png_header_only(50_000, 50_000)),
        IngestDoc.image("gif", gif.read_bytes()),
        IngestDoc.text("good-text", "the same id again"),
        IngestDoc.text("blank", " \n "),
    ]
    result = client.ingest("bad-inputs", docs, encoder_id=colqwen2_id, n_centroids=8)
    codes = {e.document: e.code for e in result.errors}
    assert codes == {"corrupt": "corrupt_image", "truncated": "pdf_truncated", "encrypted": "pdf_encrypted",
                     "empty": "pdf_empty", "huge": "image_too_large", "gif": "unsupported_type",
                     "good-text": "duplicate_id", "blank": "invalid_document"}
    assert result.version.documents == result.encoded == 2
    messages = {e.document: e.message for e in result.errors}
    assert messages["truncated"].startswith("cut.pdf: ") and "truncated" in messages["truncated"]
    assert "password" in messages["encrypted"]


def test_a_pdf_over_the_page_limit_is_refused_whole(small_server: LiveServer, colqwen2_id: str,
                                                   report_pdf: bytes) -> None:
    with Client(small_server.target, timeout=120, retries=0) as client:
        result = client.ingest("long-pdf", [IngestDoc.text("t", "a short note"), IngestDoc.pdf("report", report_pdf)],
                               encoder_id=colqwen2_id, n_centroids=4)
    assert [(e.document, e.code) for e in result.errors] == [("report", "pdf_too_many_pages")]
    assert "max_pdf_pages=2" in result.errors[0].message and result.version.documents == 1


def test_without_an_encoder_id_a_new_version_keeps_the_stable_versions_encoder(
        client: Client, colqwen2_id: str) -> None:
    first = client.ingest("same-encoder", [IngestDoc.image("chart", png_bytes(chart_image(64, 48)))],
                          encoder_id=colqwen2_id, n_centroids=4)
    second = client.ingest("same-encoder", [IngestDoc.image("chart", png_bytes(chart_image(80, 48)))], n_centroids=4)
    assert first.version.encoder_id == second.version.encoder_id == colqwen2_id
    assert second.errors == () and second.version.encoder_kind == "colqwen2"


def test_a_stream_with_nothing_indexable_is_invalid_and_leaves_no_ready_version(
        client: Client, server: LiveServer) -> None:
    with pytest.raises(InvalidArgumentError, match="none of the"):
        client.ingest("all-bad", [IngestDoc.text("a", " "), IngestDoc.image("b", b"junk")])
    assert _states(client, "all-bad") == [VersionState.FAILED]
    assert client.get_rollout("all-bad").rollout.stable is None
    assert _leftovers(server.data_dir, "all-bad") == []


# --- stream rules ----------------------------------------------------------------------------------

def test_more_documents_than_the_server_allows_is_resource_exhausted_and_publishes_nothing(
        small_server: LiveServer) -> None:
    with Client(small_server.target, timeout=120, retries=0) as client:
        with pytest.raises(ResourceExhaustedError, match="more than 3 documents"):
            client.ingest("limited", _texts(4))
        assert VersionState.READY not in _states(client, "limited")
        assert client.ingest("limited", _texts(3), n_centroids=4).encoded == 3  # at the limit is fine


def _raw_ingest(target: str, requests: list[pb.IngestRequest]) -> list[pb.IngestProgress]:
    with grpc.insecure_channel(target) as channel:
        return list(pb_grpc.IngestServiceStub(channel).Ingest(iter(requests), timeout=60))


def test_a_stream_must_start_with_options(server: LiveServer) -> None:
    document = pb.IngestRequest(document=pb.IngestDocument(id="a", text="hello"))
    with pytest.raises(grpc.RpcError) as info:
        _raw_ingest(server.target, [document])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in info.value.details() and "options" in info.value.details()


def test_options_sent_twice_are_invalid(server: LiveServer) -> None:
    options = pb.IngestRequest(options=pb.IngestOptions(index="twice"))
    with pytest.raises(grpc.RpcError) as info:
        _raw_ingest(server.target, [options, options])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options once" in info.value.details()


def test_an_invalid_index_name_is_refused_before_any_work(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.ingest("Bad Name", _texts(1))
    assert info.value.field_violations[0].field == "options.index"


def test_an_unknown_encoder_id_is_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError, match="encoder"):
        client.ingest("unknown-encoder", _texts(2), encoder_id="0" * 64)
    assert "unknown-encoder" not in {index.name for index in client.list_indexes()}  # nothing created


def test_a_cancelled_stream_publishes_nothing_and_leaves_no_temporary_files(
        server: LiveServer, client: Client, colqwen2_id: str, report_pdf: bytes) -> None:
    release = threading.Event()

    def requests():
        yield pb.IngestRequest(options=pb.IngestOptions(index="cancelled", encoder_id=colqwen2_id, pdf_dpi=36))
        for i in range(3):
            yield pb.IngestRequest(document=pb.IngestDocument(id=f"r{i}", pdf=report_pdf))
        release.wait(60)  # the caller stays silent until it cancels

    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.IngestServiceStub(channel).Ingest(requests(), timeout=60)
        first = next(call)
        assert first.stage in ("receiving", "encoding")
        _wait_for(lambda: client.list_versions("cancelled") != [])
        call.cancel()
        release.set()
    _wait_for(lambda: _states(client, "cancelled") == [VersionState.FAILED])
    assert "cancelled" in client.list_versions("cancelled")[0].error
    _wait_for(lambda: _leftovers(server.data_dir, "cancelled") == [], timeout=10)
    assert not (server.data_dir / "indexes" / "cancelled" / "v1").exists()


# --- bring your own vectors ----------------------------------------------------------------------

def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_external_vectors_are_searched_by_query_vectors_and_refuse_text_queries(client: Client) -> None:
    corpus = {f"v{i}": _unit(5, 16, seed=i) for i in range(20)}
    result = client.ingest("byo", [IngestDoc.vectors(k, m, {"n": i}) for i, (k, m) in enumerate(corpus.items())],
                           external_vectors=True, n_centroids=8)
    assert (result.version.encoder_kind, result.version.dim, result.encoded) == ("external", 16, 20)
    answer = client.search("byo", query_vectors=corpus["v7"][:3], k=3)
    assert answer[0].doc_id == "v7" and answer[0].metadata["n"] == 7
    with pytest.raises(FailedPreconditionError, match="query_vectors"):
        client.search("byo", "a text query", k=3)


def test_vectors_without_external_vectors_are_refused(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="external_vectors") as info:
        client.ingest("byo-refused", [IngestDoc.vectors("v", _unit(2, 8, 0))])
    assert info.value.field_violations[0].field == "options.external_vectors"


def test_external_vectors_whose_dim_changes_fail_the_stream_and_publish_nothing(client: Client) -> None:
    docs = [IngestDoc.vectors("a", _unit(3, 8, 0)), IngestDoc.vectors("b", _unit(3, 12, 1))]
    with pytest.raises(InvalidArgumentError, match="dim 12") as info:
        client.ingest("byo-dims", docs, external_vectors=True)
    assert info.value.field_violations[0].field == "documents[1].vectors.dim"
    assert VersionState.READY not in _states(client, "byo-dims")


def test_external_vectors_must_be_finite(client: Client) -> None:
    bad = _unit(3, 8, 0)
    bad[1, 2] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        client.ingest("byo-nan", [IngestDoc.vectors("a", _unit(3, 8, 1)), IngestDoc.vectors("b", bad)],
                      external_vectors=True)
    assert VersionState.READY not in _states(client, "byo-nan")


def test_text_in_an_external_vectors_stream_is_refused(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="must carry vectors"):
        client.ingest("byo-text", [IngestDoc.text("t", "words")], external_vectors=True)


# --- the SDK's side of the stream ------------------------------------------------------------------

def test_a_document_the_sdk_cannot_send_cancels_the_stream_and_publishes_nothing(client: Client) -> None:
    def documents():
        yield IngestDoc.text("ok", "fine")
        yield {"id": "bad", "text": "x", "colour": "red"}

    with pytest.raises(InvalidArgumentError, match="unknown document keys"):
        client.ingest("sdk-refused", documents())
    _wait_for(lambda: VersionState.BUILDING not in _states(client, "sdk-refused"), timeout=30)
    assert VersionState.READY not in _states(client, "sdk-refused")


# --- the hand-off between the receiving coroutine and the build thread ---------------------------

def _upload(i: int, size: int = 1) -> Upload:
    return Upload(id=f"d{i}", kind="image", position=i, data=b"x" * size)


async def _third_put_waits_for_a_get(channel: DocumentChannel, size: int) -> str:
    await channel.put(_upload(0, size))
    await channel.put(_upload(1, size))
    third = asyncio.create_task(channel.put(_upload(2, size)))
    await asyncio.sleep(0.05)
    assert not third.done()  # the receiver stops reading the stream (HTTP/2 flow control slows the sender)
    taken = await asyncio.to_thread(channel.get)  # the build thread's side
    await asyncio.wait_for(third, 5)
    return taken.id


def test_the_channel_holds_a_bounded_number_of_documents() -> None:
    async def run() -> str:
        return await _third_put_waits_for_a_get(DocumentChannel(asyncio.get_running_loop(), capacity=2), 1)

    assert asyncio.run(run()) == "d0"


def test_the_channel_holds_a_bounded_number_of_bytes() -> None:
    async def run() -> str:
        channel = DocumentChannel(asyncio.get_running_loop(), capacity=100, max_bytes=250)
        return await _third_put_waits_for_a_get(channel, 100)

    assert asyncio.run(run()) == "d0"


def test_an_aborted_channel_raises_the_reason_on_both_sides() -> None:
    async def run() -> None:
        channel = DocumentChannel(asyncio.get_running_loop(), capacity=1)
        await channel.put(_upload(0))
        waiting = asyncio.create_task(channel.put(_upload(1)))
        await asyncio.sleep(0.01)
        channel.abort(ResourceWarning("stop"))
        with pytest.raises(ResourceWarning):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(ResourceWarning):
            await asyncio.to_thread(channel.get)

    asyncio.run(run())
