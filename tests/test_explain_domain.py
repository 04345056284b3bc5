"""explain_document and render_explanation_png on a real version of random vectors (text
documents and pooled / unpooled pages), checked against a float64 reference."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colgrid_server.encoders.image_preprocess import patch_boxes
from colgrid_server.errors import FailedPrecondition, InvalidArgument, NotFound
from colgrid_server.index import EncoderRef, LoadedVersion, VersionWriter, open_version
from colgrid_server.index._pooling import pool_patches
from colgrid_server.search import (
    SearchParams, Searcher, check_alpha, explain_document, find_document, render_explanation_png)

DIM = 16
GRID = (5, 7)  # rows, cols
PAGE = (140, 100)  # width, height
TEXT = "the quick brown fox jumps"


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cells(rows: int, cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([r, c], axis=1).astype(np.int32)


def _page_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(PAGE[1], PAGE[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Corpus:
    """The documents as written (fp16-rounded, as the version stores them) and their patches."""

    def __init__(self, rng: np.random.Generator) -> None:
        rows, cols = GRID
        self.text_vectors = _unit(rng.standard_normal((5, DIM)))
        self.plain = _unit(rng.standard_normal((rows * cols, DIM)))  # one vector per patch
        patches = _unit(rng.standard_normal((rows * cols, DIM)))
        self.pooled = pool_patches(patches, 2)  # ceil(35 / 2) vectors standing for 1-3 patches each
        self.bare = _unit(rng.standard_normal((rows * cols, DIM)))  # a page whose image was not kept

    def stored(self, name: str) -> np.ndarray:
        vectors = {"text": self.text_vectors, "plain": self.plain, "pooled": self.pooled.vectors,
                   "bare": self.bare}[name]
        return vectors.astype(np.float16).astype(np.float64)

    def patch_vectors(self, name: str) -> np.ndarray:
        """(rows, cols, dim) float64: the stored vector each patch cell is represented by."""
        rows, cols = GRID
        out = np.zeros((rows * cols, DIM))
        if name == "pooled":
            for vector, members in zip(self.stored("pooled"), self.pooled.members):
                out[members] = vector
        else:
            out[:] = self.stored(name)
        return out.reshape(rows, cols, DIM)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(np.random.default_rng(7))


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> LoadedVersion:
    rows, cols = GRID
    cells, boxes = _cells(rows, cols), patch_boxes(rows, cols, *PAGE)
    meta = {"grid": [rows, cols], "width_px": PAGE[0], "height_px": PAGE[1]}
    spans = np.array([[i * 4, i * 4 + 3] for i in range(5)], dtype=np.int32)
    path = Path(tmp_path_factory.mktemp("explain-domain")) / "v1"
    with VersionWriter(path, encoder=EncoderRef(id="random-16", kind="colqwen2", dim=DIM)) as writer:
        writer.add("text", corpus.text_vectors, spans, TEXT, {})
        writer.add_image("plain", corpus.plain, cells=cells, boxes=boxes, metadata=meta,
                         page_image=_page_png(1), page_suffix=".png")
        writer.add_image("pooled", corpus.pooled.vectors, cells=cells, boxes=boxes,
                         members=corpus.pooled.members, metadata=meta, page_image=_page_png(2), page_suffix=".png")
        writer.add_image("bare", corpus.bare, cells=cells, boxes=boxes, metadata=meta)
        writer.finalize()
    loaded = open_version(path, device="cpu")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def query() -> tuple[np.ndarray, list[str]]:
    vectors = _unit(np.random.default_rng(11).standard_normal((4, DIM)))
    return vectors, [f"t{i}" for i in range(4)]


def _reference_sims(query: np.ndarray, stored: np.ndarray) -> np.ndarray:
    return np.asarray(query, dtype=np.float64) @ stored.T  # (Q, n)


@pytest.mark.parametrize("doc", ["text", "plain", "pooled"])
def test_score_is_exact_maxsim_against_a_float64_reference(version, corpus, query, doc):
    vectors, tokens = query
    explanation = explain_document(version, vectors, tokens, find_document(version, doc))
    expected = _reference_sims(vectors, corpus.stored(doc)).max(axis=1).sum()
    assert explanation.score == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("doc", ["text", "plain", "pooled"])
def test_score_and_matches_equal_what_a_search_returns_for_the_document(version, query, doc):
    vectors, tokens = query
    result = Searcher(version).exhaustive(vectors, tokens, SearchParams(k=version.documents, explain=True))
    hit = next(h for h in result.hits if h.doc_id == doc)
    explanation = explain_document(version, vectors, tokens, find_document(version, doc))
    assert explanation.score == pytest.approx(hit.score, rel=1e-6, abs=1e-6)
    assert [(m.doc_token_index, m.patch, m.pooled, m.start, m.end) for m in explanation.matches] == \
        [(m.doc_token_index, m.patch, m.pooled, m.start, m.end) for m in hit.explanation]
    assert [m.similarity for m in explanation.matches] == pytest.approx([m.similarity for m in hit.explanation])


@pytest.mark.parametrize("doc", ["plain", "pooled"])
def test_one_token_grid_is_that_tokens_similarity_to_each_patchs_vector(version, corpus, query, doc):
    vectors, tokens = query
    for q in range(len(tokens)):
        explanation = explain_document(version, vectors, tokens, find_document(version, doc), query_token=q)
        expected = corpus.patch_vectors(doc) @ vectors[q].astype(np.float64)
        assert explanation.grid == GRID
        np.testing.assert_allclose(explanation.patch_scores, expected, atol=1e-5)


@pytest.mark.parametrize("doc", ["plain", "pooled"])
def test_all_token_grid_is_the_sum_of_the_per_token_grids(version, corpus, query, doc):
    vectors, tokens = query
    explanation = explain_document(version, vectors, tokens, find_document(version, doc))
    expected = corpus.patch_vectors(doc) @ vectors.astype(np.float64).sum(axis=0)
    assert explanation.query_token is None
    np.testing.assert_allclose(explanation.patch_scores, expected, atol=1e-5)


def test_pooled_vector_gives_every_member_patch_its_score(version, corpus, query):
    vectors, tokens = query
    explanation = explain_document(version, vectors, tokens, find_document(version, "pooled"), query_token=0)
    flat = explanation.patch_scores.reshape(-1)
    shared = [m for m in corpus.pooled.members if len(m) > 1]
    assert shared, "pooling by 2 merges some patches"
    for members in shared:
        assert len(set(flat[members].tolist())) == 1


def test_best_patch_of_a_token_holds_the_tokens_similarity_and_the_grid_maximum(version, query):
    vectors, tokens = query
    for q in range(len(tokens)):
        explanation = explain_document(version, vectors, tokens, find_document(version, "plain"), query_token=q)
        match = explanation.matches[q]
        assert explanation.patch_scores[match.patch.row, match.patch.col] == pytest.approx(match.similarity, abs=1e-6)
        assert float(explanation.patch_scores.max()) == pytest.approx(match.similarity, abs=1e-6)


def test_page_size_comes_from_the_document(version, query):
    vectors, tokens = query
    explanation = explain_document(version, vectors, tokens, find_document(version, "plain"))
    assert (explanation.kind, explanation.page_size) == ("image", PAGE)


def test_text_document_has_spans_and_no_grid(version, query):
    vectors, tokens = query
    explanation = explain_document(version, vectors, tokens, find_document(version, "text"))
    assert explanation.kind == "text"
    assert explanation.grid is None and explanation.patch_scores is None and explanation.page_size is None
    for m in explanation.matches:
        assert TEXT[m.start:m.end] == m.doc_token and m.patch is None


def test_shares_add_up_to_one(version, query):
    vectors, tokens = query
    explanation = explain_document(version, vectors, tokens, find_document(version, "pooled"))
    assert sum(m.share for m in explanation.matches) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("token", [-1, 4, 100])
def test_query_token_out_of_range_is_invalid(version, query, token):
    vectors, tokens = query
    with pytest.raises(InvalidArgument, match="query_token") as info:
        explain_document(version, vectors, tokens, find_document(version, "plain"), query_token=token)
    assert info.value.field == "query_token"


def test_query_of_the_wrong_dim_is_invalid(version):
    with pytest.raises(InvalidArgument, match="expected"):
        explain_document(version, np.ones((2, DIM + 1), np.float32), ["a", "b"], 0)


def test_unknown_document_is_not_found_naming_it_and_the_version(version):
    with pytest.raises(NotFound, match="'nope' is not in pages/v1") as info:
        find_document(version, "nope", index="pages")
    assert info.value.resource_name == "nope"


def test_render_is_a_png_of_the_page_size_that_differs_from_the_page(version, query):
    vectors, tokens = query
    doc = find_document(version, "plain")
    png = render_explanation_png(version, doc, explain_document(version, vectors, tokens, doc), 0.5)
    rendered = Image.open(io.BytesIO(png))
    assert rendered.format == "PNG" and rendered.size == PAGE
    page = Image.open(version.page_image_path(doc)).convert("RGB")
    assert np.abs(np.asarray(rendered.convert("RGB"), np.int16) - np.asarray(page, np.int16)).mean() > 5


def test_render_with_alpha_zero_is_the_page_itself(version, query):
    vectors, tokens = query
    doc = find_document(version, "plain")
    png = render_explanation_png(version, doc, explain_document(version, vectors, tokens, doc), 0.0)
    page = Image.open(version.page_image_path(doc)).convert("RGB")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(page))


def test_render_without_a_kept_page_image_fails_precondition(version, query):
    vectors, tokens = query
    doc = find_document(version, "bare")
    with pytest.raises(FailedPrecondition, match="kept no page image"):
        render_explanation_png(version, doc, explain_document(version, vectors, tokens, doc))


def test_render_of_a_text_document_fails_precondition(version, query):
    vectors, tokens = query
    doc = find_document(version, "text")
    with pytest.raises(FailedPrecondition, match="text document"):
        render_explanation_png(version, doc, explain_document(version, vectors, tokens, doc))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_zero_to_one_is_invalid(alpha):
    with pytest.raises(InvalidArgument, match="alpha") as info:
        check_alpha(alpha)
    assert info.value.field == "alpha"
