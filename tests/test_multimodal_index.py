"""Mixed indexes under one multimodal encoder: text files, images and PDF pages built into one
version from real generated inputs, searched with patch-level explanations; bad inputs refused
one by one while the rest is indexed; hierarchical token pooling maps back to patches."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from colgrid_registry import VersionState, open_registry
from colgrid_server.builder import build_index_from_sources
from colgrid_server.encoders import load_any_encoder
from colgrid_server.errors import InvalidArgument
from colgrid_server.index import open_version, verify_version
from colgrid_server.ingest import ErrorCode, iter_sources
from colgrid_server.ingest.build import build_version_from_sources
from colgrid_server.paths import DataDir
from colgrid_server.search import SearchParams, Searcher
from tests.documents_gen import png_header_only, write_encrypted_pdf, write_report_pdf, write_zero_page_pdf

DPI = 36  # small pages: quick tests
PARAMS = {"n_centroids": 16}


@pytest.fixture(scope="module")
def encoder(colqwen2_encoder_dir: Path):
    return load_any_encoder(colqwen2_encoder_dir)


@pytest.fixture(scope="module")
def mixed_version(encoder, mixed_sources_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "v1"
    report = build_version_from_sources(iter_sources(mixed_sources_dir, pdf_dpi=DPI), encoder, out,
                                        build_params=PARAMS)
    assert report.errors == ()
    return out


def _search(version_dir: Path, encoder, query: str, k: int = 10):
    version = open_version(version_dir)
    encoded = encoder.encode_queries([query])[0]
    return version, Searcher(version).search(encoded.vectors, encoded.tokens, SearchParams(k=k, explain=True))


def test_a_mixed_folder_becomes_one_version_of_text_images_and_pages(mixed_version: Path, encoder) -> None:
    version, result = _search(mixed_version, encoder, "quarterly profit margins")
    assert sorted(version.doc_ids) == sorted(["chart.png", "notes.txt", "photo.jpg", "readme.md", "report.pdf#p1",
                                              "report.pdf#p2", "report.pdf#p3"])
    kinds = {hit.doc_id: hit.kind for hit in result.hits}
    assert kinds["notes.txt"] == "text" and kinds["report.pdf#p2"] == "image" and kinds["chart.png"] == "image"
    assert verify_version(mixed_version)


def test_image_hits_explain_each_query_token_by_a_patch_inside_the_page(mixed_version: Path, encoder) -> None:
    _version, result = _search(mixed_version, encoder, "line chart of revenue by month")
    images = [hit for hit in result.hits if hit.kind == "image"]
    assert images
    for hit in images:
        width, height = hit.metadata["width_px"], hit.metadata["height_px"]
        rows, cols = hit.metadata["grid"]
        assert len(hit.explanation) == result.stats.query_tokens
        for match in hit.explanation:
            x0, y0, x1, y1 = match.patch.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert 0 <= match.patch.row < rows and 0 <= match.patch.col < cols
        assert abs(sum(m.similarity for m in hit.explanation) - hit.score) < 1e-3


def test_text_hits_in_a_mixed_index_keep_character_spans(mixed_version: Path, encoder) -> None:
    version, result = _search(mixed_version, encoder, "photo of the coast at sunset")
    text_hit = next(hit for hit in result.hits if hit.doc_id == "readme.md")
    text = version.texts[version.doc_ids.index("readme.md")]
    spans = [m for m in text_hit.explanation if m.start >= 0]
    assert spans and all(text[m.start:m.end] == m.doc_token for m in spans)
    assert all(m.patch is None for m in text_hit.explanation)


def test_page_images_are_kept_in_the_version_at_the_encoded_size(mixed_version: Path) -> None:
    from PIL import Image

    version = open_version(mixed_version)
    page = version.doc_ids.index("report.pdf#p3")
    path = version.page_image_path(page)
    meta = version.metadata(page)
    with Image.open(path) as image:
        assert image.size == (meta["width_px"], meta["height_px"])
    assert version.page_image_path(version.doc_ids.index("notes.txt")) is None


def test_pooling_stores_fewer_vectors_that_map_back_to_every_patch(encoder, mixed_sources_dir: Path,
                                                                  tmp_path: Path) -> None:
    report = build_version_from_sources(iter_sources(mixed_sources_dir, pdf_dpi=DPI), encoder, tmp_path / "pooled",
                                        build_params=PARAMS, pool_factor=3)
    version = open_version(tmp_path / "pooled")
    for doc, doc_id in enumerate(version.doc_ids):
        if not version.is_image(doc):
            continue
        meta = version.metadata(doc)
        lo, hi = int(version.doc_offsets[doc]), int(version.doc_offsets[doc + 1])
        assert hi - lo == meta["pooled_vectors"] == -(-meta["patches"] // 3)
        cells = np.concatenate([version.token_patches(t)[0] for t in range(lo, hi)])
        rows, cols = meta["grid"]
        assert sorted(map(tuple, cells.tolist())) == [(r, c) for r in range(rows) for c in range(cols)]
    assert report.summary.tokens == version.tokens_count
    assert version.attrs["build_params"]["pool_factor"] == 3


def test_pooled_explanations_list_the_other_patches_of_the_vector(encoder, mixed_sources_dir: Path,
                                                                 tmp_path: Path) -> None:
    build_version_from_sources(iter_sources(mixed_sources_dir, pdf_dpi=DPI), encoder, tmp_path / "pooled",
                               build_params=PARAMS, pool_factor=2)
    _version, result = _search(tmp_path / "pooled", encoder, "quarterly profit margins table")
    pooled = [m for hit in result.hits if hit.kind == "image" for m in hit.explanation]
    assert pooled and any(m.pooled for m in pooled)
    for match in pooled:
        assert match.patch not in match.pooled


def _bad_inputs(directory: Path) -> Path:
    """One good PDF and text file beside every kind of bad input the issue names."""
    directory.mkdir()
    write_report_pdf(directory / "good.pdf")
    (directory / "good.txt").write_text("A perfectly good text document about margins.\n")
    (directory / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image at all")
    truncated = (directory / "good.pdf").read_bytes()
    (directory / "truncated.pdf").write_bytes(truncated[: len(truncated) // 2])
    write_encrypted_pdf(directory / "good.pdf", directory / "encrypted.pdf")
    write_zero_page_pdf(directory / "empty.pdf")
    (directory / "huge.png").write_bytes(png_header_only(50_000, 50_000))
    (directory / "data.xyz").write_bytes(b"\x00\x01")
    return directory


def test_bad_inputs_are_refused_one_by_one_and_the_rest_is_indexed(encoder, tmp_path: Path) -> None:
    sources = _bad_inputs(tmp_path / "in")
    refused = []
    report = build_version_from_sources(iter_sources(sources, pdf_dpi=DPI), encoder, tmp_path / "v1",
                                        build_params=PARAMS, on_error=refused.append)
    codes = {error.id: error.code for error in refused}
    assert codes == {
        "corrupt.png": ErrorCode.CORRUPT_IMAGE,
        "truncated.pdf": ErrorCode.PDF_TRUNCATED,
        "encrypted.pdf": ErrorCode.PDF_ENCRYPTED,
        "empty.pdf": ErrorCode.PDF_EMPTY,
        "huge.png": ErrorCode.IMAGE_TOO_LARGE,
        "data.xyz": ErrorCode.UNSUPPORTED_TYPE,
    }
    assert all(error.reason for error in refused)
    assert report.errors == tuple(refused)
    assert sorted(open_version(tmp_path / "v1").doc_ids) == ["good.pdf#p1", "good.pdf#p2", "good.pdf#p3", "good.txt"]


def test_images_for_a_text_only_encoder_are_refused_by_name(text_encoder, mixed_sources_dir: Path,
                                                            tmp_path: Path) -> None:
    refused = []
    build_version_from_sources(iter_sources(mixed_sources_dir, pdf_dpi=DPI), text_encoder, tmp_path / "v1",
                               build_params=PARAMS, on_error=refused.append)
    assert {e.code for e in refused} == {ErrorCode.UNSUPPORTED_BY_ENCODER}
    assert {e.id for e in refused} == {"chart.png", "photo.jpg", "report.pdf#p1", "report.pdf#p2", "report.pdf#p3"}
    assert sorted(open_version(tmp_path / "v1").doc_ids) == ["notes.txt", "readme.md"]


def test_nothing_is_published_when_no_input_can_be_indexed(encoder, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "corrupt.png").write_bytes(b"not a png")
    with pytest.raises(InvalidArgument, match="none of the 1 inputs could be indexed.*corrupt.png"):
        build_version_from_sources(iter_sources(tmp_path / "in"), encoder, tmp_path / "v1", build_params=PARAMS)
    assert not (tmp_path / "v1").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v1")]


def test_a_registered_mixed_build_is_ready_and_stable(colqwen2_encoder_dir: Path, mixed_sources_dir: Path,
                                                       tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    with open_registry(data.registry_file) as registry:
        outcome = build_index_from_sources(data, registry, "pages", iter_sources(mixed_sources_dir, pdf_dpi=DPI),
                                           encoder_dir=colqwen2_encoder_dir, pool_factor=2, build_params=PARAMS,
                                           progress=False)
        record = registry.get_version("pages", outcome.version)
        assert record.state is VersionState.READY and record.encoder_kind == "colqwen2"
        assert registry.get_rollout("pages").stable == outcome.version
        assert record.build_params["pool_factor"] == 2
    # The encoder was imported into the data dir: a server on it can load what the version pins.
    assert any(p.is_dir() for p in data.encoders.iterdir())
    shutil.rmtree(tmp_path / "data")
