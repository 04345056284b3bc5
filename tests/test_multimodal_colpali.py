"""ColPali (PaliGemma) exported to ONNX and served: the serving path reproduces colpali-engine's model.

A tiny random ColPali (SigLIP 56 px / patch 14, Gemma 2 layers, built offline by `tiny_models`)
is exported once per module; comparisons are against colpali-engine's ColPali + ColPaliProcessor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from colpali_engine.models import ColPali, ColPaliProcessor
from PIL import Image

from colgrid_server.encoders import MultimodalEncoder, MultimodalExportReport, export_colpali, load_multimodal_encoder
from colgrid_server.encoders.tiny_models import build_tiny_colpali

MIN_COSINE = 0.999
QUERIES = ["line chart", "Which page has the table labelled Quarterly Profit Margins?", "naïve café — 42 %"]
SIZES = [(56, 56), (300, 120), (90, 400)]  # SigLIP stretches every page to 56 x 56


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_colpali(tmp_path_factory.mktemp("tiny-colpali") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def report(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> MultimodalExportReport:
    return export_colpali(checkpoint, tmp_path_factory.mktemp("export") / "tiny-colpali", progress=False)


@pytest.fixture(scope="module")
def encoder(report: MultimodalExportReport) -> MultimodalEncoder:
    return load_multimodal_encoder(report.path, threads=2)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[ColPali, ColPaliProcessor]:
    return (ColPali.from_pretrained(checkpoint, attn_implementation="eager").eval(),
            ColPaliProcessor.from_pretrained(checkpoint))


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _torch(model, batch) -> np.ndarray:
    with torch.inference_mode():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_export_reports_parity_at_or_above_0_999(report: MultimodalExportReport) -> None:
    assert report.kind == "colpali"
    assert min(report.query_min_cosine, report.image_min_cosine, report.end_to_end_min_cosine) >= MIN_COSINE


def test_encoder_json_records_fixed_size_preprocessing_and_the_bos_prefix(encoder, reference) -> None:
    _, processor = reference
    image, spec = encoder.image_spec, encoder.spec
    assert (image.resize, image.height, image.width, image.patch_size, image.merge_size) == ("fixed", 56, 56, 14, 1)
    assert image.mean == (0.5, 0.5, 0.5) and image.image_token_id == processor.image_token_id
    assert spec.query_marker == "<bos>" and spec.document_marker == "<bos>"
    assert spec.query_suffix == "<pad>" * 10


def test_image_graph_takes_token_type_ids(report: MultimodalExportReport) -> None:
    session = ort.InferenceSession(str(report.path / "image.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == {"input_ids", "attention_mask", "token_type_ids",
                                                       "pixel_values"}


def test_batched_queries_match_pytorch(encoder: MultimodalEncoder, reference) -> None:
    model, processor = reference
    batch = processor.process_queries(QUERIES)
    out = _torch(model, batch)
    for i, encoded in enumerate(encoder.encode_queries(QUERIES)):
        expected = out[i, batch["attention_mask"][i].bool().numpy()]
        assert encoded.vectors.shape == expected.shape
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE


def test_images_of_several_aspect_ratios_match_pytorch(encoder: MultimodalEncoder, reference, pages) -> None:
    model, processor = reference
    batch = processor.process_images(pages)
    out = _torch(model, batch)
    ids = batch["input_ids"].numpy()
    for i, encoded in enumerate(encoder.encode_images(pages)):
        expected = out[i, ids[i] == processor.image_token_id]
        assert encoded.vectors.shape == expected.shape == (16, encoder.dim)
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE


def test_text_documents_match_pytorch(encoder: MultimodalEncoder, reference) -> None:
    model, processor = reference
    texts = ["Operating expenses by quarter", "A note."]
    batch = processor.process_texts(texts)
    out = _torch(model, batch)
    for i, encoded in enumerate(encoder.encode_documents(texts)):
        expected = out[i, batch["attention_mask"][i].bool().numpy()]
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE


def test_patch_boxes_map_the_stretched_grid_back_onto_the_page(encoder: MultimodalEncoder, pages) -> None:
    encoded = encoder.encode_images([pages[1]])[0]  # 300 x 120 page, 4 x 4 grid
    assert encoded.grid == (4, 4) and encoded.size == (300, 120)
    assert encoded.boxes[0].tolist() == [0, 0, 75, 30] and encoded.boxes[-1].tolist() == [225, 90, 300, 120]
