"""The Explain RPC end to end: a real server on loopback serving versions built from real inputs
(a 3-page PDF, a chart PNG, a photo JPEG, two text files) with the tiny ColQwen2, called
through the SDK."""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colgrid_client import (
    AsyncClient, Client, FailedPreconditionError, InvalidArgumentError, NotFoundError)
from colgrid_registry import open_registry
from colgrid_server.builder import build_index_from_sources
from colgrid_server.ingest import iter_sources
from colgrid_server.paths import DataDir
from tests.conftest import start_live_server, stop_live_server

QUERY = "profit margin by quarter"
PAGES = ("chart.png", "photo.jpg", "report.pdf#p1", "report.pdf#p2", "report.pdf#p3")
TEXTS = ("notes.txt", "readme.md")


@pytest.fixture(scope="module")
def tiny_colqwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from colgrid_server.encoders import export_colqwen2
    from colgrid_server.encoders.tiny_models import build_tiny_colqwen2

    root = tmp_path_factory.mktemp("explain-colqwen2")
    return export_colqwen2(build_tiny_colqwen2(root / "ckpt", seed=0), root / "encoder", progress=False).path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_colqwen2, mixed_sources_dir):
    """`pages`: one vector per patch; `pooled`: pool factor 2 (a vector stands for 1-3 patches).
    Both serve v1."""
    data_dir = tmp_path_factory.mktemp("explain-served")
    with open_registry(DataDir(data_dir).registry_file) as registry:
        for name, factor in (("pages", 1), ("pooled", 2)):
            build_index_from_sources(DataDir(data_dir), registry, name, iter_sources(mixed_sources_dir, pdf_dpi=36),
                                     encoder_dir=tiny_colqwen2, pool_factor=factor,
                                     build_params={"n_centroids": 16}, progress=False)
        # pages/v2: READY but never routed to, so this server does not load it
        build_index_from_sources(DataDir(data_dir), registry, "pages", iter_sources(mixed_sources_dir / "notes.txt"),
                                 encoder_dir=tiny_colqwen2, activate=False, build_params={"n_centroids": 4},
                                 progress=False)
    live, thread = start_live_server(data_dir)
    yield live
    stop_live_server(live, thread)


@pytest.fixture()
def client(server):
    with Client(server.target, timeout=60, retries=0) as c:
        yield c


def _page(client: Client, index: str, doc_id: str) -> Image.Image:
    """The page image the version stores for `doc_id`, as a plain RGB image."""
    hit = next(h for h in client.search(index, QUERY, k=10, exhaustive=True) if h.doc_id == doc_id)
    version = client.get_version(index, hit.version)
    return Image.open(Path(version.storage_uri) / hit.metadata["page_image"]).convert("RGB")


# --- scores and matches --------------------------------------------------------------------------

@pytest.mark.parametrize("index", ["pages", "pooled"])
def test_score_and_matches_equal_the_search_hit_for_every_document(client, index):
    result = client.search(index, QUERY, k=10, exhaustive=True, explain=True)
    assert {h.doc_id for h in result} == set(PAGES + TEXTS)
    for hit in result:
        explanation = client.explain(index, hit.doc_id, QUERY)
        assert (explanation.doc_id, explanation.version, explanation.kind) == (hit.doc_id, result.version, hit.kind)
        assert explanation.score == pytest.approx(hit.score, rel=1e-5, abs=1e-5)
        assert [(m.query_token, m.doc_token_index, m.patch, m.pooled) for m in explanation.matches] == \
            [(m.query_token, m.doc_token_index, m.patch, m.pooled) for m in hit.explanation]


def test_query_vectors_explain_like_the_text_they_encode(client):
    vectors = client.encode_query("pages", QUERY)
    by_text = client.explain("pages", "chart.png", QUERY)
    by_vectors = client.explain("pages", "chart.png", query_vectors=vectors)
    assert by_vectors.score == pytest.approx(by_text.score, rel=1e-5)
    np.testing.assert_allclose(by_vectors.patch_scores, by_text.patch_scores, atol=1e-5)


def test_response_names_the_version_and_encoder_that_answered(client):
    explanation = client.explain("pages", "report.pdf#p2", QUERY)
    assert explanation.index == "pages" and explanation.version == "v1"
    assert explanation.encoder_id == client.get_version("pages", "v1").encoder_id


# --- the patch grid ------------------------------------------------------------------------------

@pytest.mark.parametrize("doc_id", PAGES)
def test_patch_scores_grid_has_the_documents_grid_shape(client, doc_id):
    hit = next(h for h in client.search("pages", QUERY, k=10, exhaustive=True) if h.doc_id == doc_id)
    explanation = client.explain("pages", doc_id, QUERY)
    rows, cols = (int(x) for x in hit.metadata["grid"])
    assert explanation.grid == (rows, cols)
    assert len(explanation.patch_scores) == rows and {len(r) for r in explanation.patch_scores} == {cols}
    assert np.isfinite(np.array(explanation.patch_scores)).all()
    assert (explanation.width, explanation.height) == (hit.metadata["width_px"], hit.metadata["height_px"])


@pytest.mark.parametrize("index", ["pages", "pooled"])
def test_every_tokens_patch_box_lies_inside_the_page(client, index):
    for doc_id in PAGES:
        explanation = client.explain(index, doc_id, QUERY)
        for m in explanation.matches:
            rows, cols = explanation.grid
            for patch in (m.patch, *m.pooled):
                x0, y0, x1, y1 = patch.box
                assert 0 <= x0 < x1 <= explanation.width and 0 <= y0 < y1 <= explanation.height
                assert 0 <= patch.row < rows and 0 <= patch.col < cols


def test_one_token_map_holds_its_best_patchs_similarity_at_its_maximum(client):
    for q in range(3):
        explanation = client.explain("pages", "report.pdf#p1", QUERY, query_token=q)
        match = explanation.matches[q]
        scores = np.array(explanation.patch_scores)
        assert scores[match.patch.row, match.patch.col] == pytest.approx(match.similarity, abs=1e-4)
        assert scores.max() == pytest.approx(match.similarity, abs=1e-4)


def test_pooled_members_share_their_vectors_score(client):
    shared = 0
    for doc_id in PAGES:
        for q in range(2):
            explanation = client.explain("pooled", doc_id, QUERY, query_token=q)
            scores = explanation.patch_scores
            match = explanation.matches[q]
            for member in match.pooled:
                assert scores[member.row][member.col] == scores[match.patch.row][match.patch.col]
                shared += 1
    assert shared > 0, "pool factor 2 makes vectors that stand for several patches"


def test_query_token_selects_one_tokens_map(client):
    all_tokens = np.array(client.explain("pages", "chart.png", QUERY).patch_scores)
    maps = [np.array(client.explain("pages", "chart.png", QUERY, query_token=q).patch_scores)
            for q in range(len(client.explain("pages", "chart.png", QUERY).matches))]
    assert not np.allclose(maps[0], all_tokens)
    assert not np.allclose(maps[0], maps[1])
    np.testing.assert_allclose(sum(maps), all_tokens, rtol=1e-4, atol=1e-4)  # all tokens: summed


# --- heatmaps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc_id", ["chart.png", "report.pdf#p3"])
def test_heatmap_png_decodes_to_the_page_size_and_differs_from_the_page(client, doc_id):
    explanation = client.explain("pages", doc_id, QUERY, render=True)
    heatmap = Image.open(io.BytesIO(explanation.heatmap_png))
    page = _page(client, "pages", doc_id)
    assert heatmap.format == "PNG"
    assert heatmap.size == page.size == (explanation.width, explanation.height)
    difference = np.abs(np.asarray(heatmap.convert("RGB"), np.int16) - np.asarray(page, np.int16))
    assert difference.mean() > 5


def test_one_tokens_heatmap_differs_from_the_all_token_heatmap(client):
    all_tokens = client.explain("pages", "report.pdf#p1", QUERY, render=True).heatmap_png
    one = client.explain("pages", "report.pdf#p1", QUERY, render=True, query_token=1).heatmap_png
    assert np.asarray(Image.open(io.BytesIO(one))).tolist() != np.asarray(Image.open(io.BytesIO(all_tokens))).tolist()


def test_alpha_sets_how_much_heat_covers_the_page(client):
    page = np.asarray(_page(client, "pages", "photo.jpg"), np.int16)

    def distance(alpha: float) -> float:
        png = client.explain("pages", "photo.jpg", QUERY, render=True, alpha=alpha).heatmap_png
        return float(np.abs(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int16) - page).mean())

    assert distance(0.2) < distance(0.5) < distance(1.0)


def test_heatmap_only_comes_when_asked_for(client, tmp_path):
    explanation = client.explain("pages", "chart.png", QUERY)
    assert explanation.heatmap_png == b""
    with pytest.raises(ValueError, match="render=True"):
        explanation.save_heatmap(tmp_path / "none.png")


def test_save_heatmap_writes_the_png(client, tmp_path):
    explanation = client.explain("pooled", "report.pdf#p2", QUERY, render=True)
    written = explanation.save_heatmap(tmp_path / "heat.png")
    assert written.read_bytes() == explanation.heatmap_png
    assert Image.open(written).size == (explanation.width, explanation.height)


# --- text documents ------------------------------------------------------------------------------

@pytest.mark.parametrize("doc_id", TEXTS)
def test_text_document_has_character_spans_and_no_grid_or_png(client, doc_id):
    explanation = client.explain("pages", doc_id, QUERY, render=True)
    assert explanation.kind == "text"
    assert explanation.grid is None and explanation.patch_scores == [] and explanation.heatmap_png == b""
    spanned = [m for m in explanation.matches if m.start >= 0]
    assert spanned, "a text document's tokens carry character spans"
    for m in spanned:
        assert m.end > m.start and m.doc_token and m.patch is None


# --- pinned versions, the async client -----------------------------------------------------------

def test_a_named_loaded_version_answers(client):
    explanation = client.explain("pooled", "chart.png", QUERY, version="v1")
    assert explanation.version == "v1"


def test_a_named_version_not_loaded_here_fails_precondition(client):
    with pytest.raises(FailedPreconditionError, match="v2 is not loaded on this server"):
        client.explain("pages", "notes.txt", QUERY, version="v2")


def test_async_client_explains_too(server):
    async def run():
        async with AsyncClient(server.target, timeout=60, retries=0) as aclient:
            return await aclient.explain("pages", "photo.jpg", QUERY, query_token=0, render=True)

    explanation = asyncio.run(run())
    assert explanation.query_token == 0 and explanation.heatmap_png.startswith(b"\x89PNG")


# --- bad requests --------------------------------------------------------------------------------

def test_unknown_document_is_not_found_naming_it_and_the_version(client):
    with pytest.raises(NotFoundError, match=r"'nope\.pdf#p9' is not in pages/v1") as info:
        client.explain("pages", "nope.pdf#p9", QUERY)
    assert info.value.resource_info.resource_name == "nope.pdf#p9"


def test_unknown_index_is_not_found(client):
    with pytest.raises(NotFoundError, match="no-such-index"):
        client.explain("no-such-index", "chart.png", QUERY)


def test_unknown_version_is_not_found(client):
    with pytest.raises(NotFoundError, match="v9"):
        client.explain("pages", "chart.png", QUERY, version="v9")


@pytest.mark.parametrize("token", [10_000, -1])
def test_query_token_out_of_range_is_invalid(client, token):
    with pytest.raises(InvalidArgumentError, match="query_token") as info:
        client.explain("pages", "chart.png", QUERY, query_token=token)
    assert info.value.field_violations[0].field == "query_token"


@pytest.mark.parametrize("alpha", [-0.5, 1.5, float("nan")])
def test_alpha_outside_zero_to_one_is_invalid(client, alpha):
    with pytest.raises(InvalidArgumentError, match="alpha"):
        client.explain("pages", "chart.png", QUERY, render=True, alpha=alpha)


def test_missing_doc_id_and_empty_query_are_invalid(client):
    with pytest.raises(InvalidArgumentError, match="doc_id"):
        client.explain("pages", "", QUERY)
    with pytest.raises(InvalidArgumentError, match="query"):
        client.explain("pages", "chart.png", "  ")


def test_server_keeps_serving_after_bad_requests(client):
    for bad in ({"doc_id": "nope"}, {"query_token": 999}, {"alpha": 7.0}):
        with pytest.raises((NotFoundError, InvalidArgumentError, FailedPreconditionError)):
            client.explain("pages", **{"doc_id": "chart.png", "query": QUERY, **bad})
    assert client.explain("pages", "chart.png", QUERY, render=True).heatmap_png
    assert len(client.search("pages", QUERY, k=3)) == 3
