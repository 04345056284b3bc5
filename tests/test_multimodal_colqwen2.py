"""ColQwen2 exported to ONNX and served: the serving path reproduces colpali-engine's PyTorch model.

A tiny random ColQwen2 (built offline by `tiny_models`) is exported once per module and loaded
with onnxruntime; every comparison is against colpali-engine's own ColQwen2 + ColQwen2Processor
on the same inputs, on image sizes and aspect ratios the export never saw.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from colpali_engine.models import ColQwen2, ColQwen2Processor
from PIL import Image, ImageDraw

from colgrid_server.encoders import (EncodedImage, MultimodalEncoder, MultimodalExportReport, encoder_id,
                                     export_colqwen2, load_encoder, load_multimodal_encoder, load_spec)
from colgrid_server.encoders._image_feeds import qwen2_vl_feeds
from colgrid_server.encoders.tiny_models import build_tiny_colqwen2, build_tiny_colqwen2_adapter
from colgrid_server.errors import EncoderError, FailedPrecondition, InvalidArgument

MIN_COSINE = 0.999
QUERIES = ["line chart of revenue",
           "Which page has the table labelled Quarterly Profit Margins?",
           "Zürich — naïve café prices (2024), €"]
# None of these sizes is among the export's parity or trace images.
SIZES = [(140, 420), (600, 300), (56, 56), (333, 250)]


def _page(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(170, 256, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for y in range(8, height, 16):
        draw.line([(6, y), (int(width * rng.uniform(0.3, 0.9)), y)], fill=(10, 10, 10), width=2)
    return image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_colqwen2(tmp_path_factory.mktemp("tiny-colqwen2") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def report(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> MultimodalExportReport:
    return export_colqwen2(checkpoint, tmp_path_factory.mktemp("export") / "tiny-colqwen2", progress=False)


@pytest.fixture(scope="module")
def encoder(report: MultimodalExportReport) -> MultimodalEncoder:
    return load_multimodal_encoder(report.path, threads=2)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[ColQwen2, ColQwen2Processor]:
    model = ColQwen2.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return model, ColQwen2Processor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    return [_page(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


def _torch(model, batch) -> np.ndarray:
    with torch.inference_mode():
        return model(**batch).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _torch_image_vectors(model, processor, images) -> list[np.ndarray]:
    batch = processor.process_images(images)
    out = _torch(model, batch)
    ids = batch["input_ids"].numpy()
    return [out[i, ids[i] == model.config.image_token_id] for i in range(len(images))]


def _torch_query_vectors(model, processor, texts) -> list[np.ndarray]:
    batch = processor.process_queries(texts)
    out = _torch(model, batch)
    return [out[i, batch["attention_mask"][i].bool().numpy()] for i in range(len(texts))]


# ------------------------------------------------------------------------------------ export

def test_export_reports_graph_parity_at_or_above_0_999(report: MultimodalExportReport) -> None:
    assert report.query_min_cosine >= MIN_COSINE and report.image_min_cosine >= MIN_COSINE
    assert report.end_to_end_min_cosine >= MIN_COSINE
    assert not report.merged_adapter


def test_export_parity_covers_several_sizes_and_aspect_ratios(report: MultimodalExportReport) -> None:
    ratios = {round(w / h, 2) for w, h in report.image_sizes}
    assert len(report.image_sizes) >= 4 and len(ratios) >= 4
    assert any(w / h > 1.5 for w, h in report.image_sizes) and any(h / w > 1.5 for w, h in report.image_sizes)


def test_encoder_json_records_the_processors_preprocessing(report, reference) -> None:
    model, processor = reference
    spec = load_spec(report.path)
    image, ip = spec.image, processor.image_processor
    assert (image.min_pixels, image.max_pixels) == (ip.size["shortest_edge"], ip.size["longest_edge"])
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (14, 2, 2)
    assert image.mean == tuple(ip.image_mean) and image.std == tuple(ip.image_std)
    assert (image.resample, image.resize) == ("bicubic", "smart")
    assert image.image_token_id == model.config.image_token_id and image.prompt == processor.visual_prompt_prefix
    assert spec.query_suffix == "<|endoftext|>" * 10 and spec.padding_side == "left"
    assert image.parity is not None and image.parity.min_patch_cosine == report.image_min_cosine


def test_encoder_directory_holds_graphs_tokenizer_and_spec_only(report) -> None:
    assert sorted(p.name for p in report.path.iterdir()) == ["encoder.json", "image.onnx", "text.onnx",
                                                             "tokenizer.json"]
    assert report.encoder_id == encoder_id(report.path)


def test_export_refuses_a_non_empty_output_directory(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty"):
        export_colqwen2(checkpoint, tmp_path / "taken", progress=False)


def test_export_refuses_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        export_colqwen2(tmp_path, tmp_path / "out", progress=False)
    assert err.value.field == "checkpoint"


def test_failed_parity_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="parity failed"):
        export_colqwen2(checkpoint, tmp_path / "out", min_token_cosine=1.5, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_lora_adapter_is_merged_and_matches_the_unmerged_model(checkpoint: Path, tmp_path: Path, pages) -> None:
    from peft import PeftModel

    adapter = build_tiny_colqwen2_adapter(checkpoint, tmp_path / "adapter", seed=1)
    report = export_colqwen2(adapter, tmp_path / "out", progress=False)
    assert report.merged_adapter and report.image_min_cosine >= MIN_COSINE
    served = load_multimodal_encoder(report.path, threads=2)
    base = ColQwen2.from_pretrained(checkpoint, attn_implementation="eager").eval()
    unmerged = PeftModel.from_pretrained(base, str(adapter)).eval()
    processor = ColQwen2Processor.from_pretrained(adapter)
    ours = served.encode_images(pages[:2])
    theirs = _torch_image_vectors(unmerged, processor, pages[:2])
    for encoded, expected in zip(ours, theirs):
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE
    # The adapter changes the vectors: merging it (not dropping it) is what the parity shows.
    plain = _torch_image_vectors(ColQwen2.from_pretrained(checkpoint, attn_implementation="eager").eval(),
                                 processor, pages[:1])[0]
    assert _cosines(ours[0].vectors, plain).min() < 0.99


# ----------------------------------------------------------------------------------- serving

def test_batched_queries_match_pytorch(encoder: MultimodalEncoder, reference) -> None:
    ours = encoder.encode_queries(QUERIES)
    theirs = _torch_query_vectors(*reference, QUERIES)
    for encoded, expected in zip(ours, theirs):
        assert encoded.vectors.shape == expected.shape
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE


def test_query_rows_carry_spans_into_the_text_and_none_for_the_suffix(encoder: MultimodalEncoder) -> None:
    text = QUERIES[1]
    (encoded,) = encoder.encode_queries([text])
    augmentation = [i for i, t in enumerate(encoded.tokens) if t == "<|endoftext|>"]
    assert len(augmentation) == 10 and augmentation == list(range(len(encoded.tokens) - 10, len(encoded.tokens)))
    assert all(tuple(encoded.spans[i]) == (-1, -1) for i in augmentation)
    pieces = [text[s:e] for s, e in encoded.spans if s >= 0]
    assert "".join(pieces) == text


def test_images_of_new_sizes_match_pytorch(encoder: MultimodalEncoder, reference, pages) -> None:
    ours = encoder.encode_images(pages)
    theirs = _torch_image_vectors(*reference, pages)
    for encoded, expected in zip(ours, theirs):
        assert encoded.vectors.shape == expected.shape
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE


def test_text_documents_match_pytorch_without_the_query_suffix(encoder: MultimodalEncoder, reference) -> None:
    model, processor = reference
    texts = ["Operating expenses by quarter", "A short note."]
    ours = encoder.encode_documents(texts)
    batch = processor.process_texts(texts)
    out = _torch(model, batch)
    for i, encoded in enumerate(ours):
        expected = out[i, batch["attention_mask"][i].bool().numpy()]
        assert "<|endoftext|>" not in encoded.tokens
        assert _cosines(encoded.vectors, expected).min() >= MIN_COSINE


def test_image_vectors_do_not_depend_on_batch_companions(encoder: MultimodalEncoder, pages) -> None:
    alone = encoder.encode_images([pages[2]])[0]
    batched = encoder.encode_images(pages, batch_size=4)[2]
    assert np.abs(alone.vectors - batched.vectors).max() < 1e-5


def test_encoded_image_maps_each_vector_to_a_grid_cell_and_a_box_on_the_page(encoder, pages) -> None:
    page = pages[3]  # 333 x 250, over the 50,176-pixel budget: resized to 252 x 168, 9 x 6 merged patches
    (encoded,) = encoder.encode_images([page])
    assert isinstance(encoded, EncodedImage) and encoded.size == (333, 250)
    rows, cols = encoded.grid
    assert (rows, cols) == (6, 9) and encoded.vectors.shape == (rows * cols, encoder.dim)
    assert encoded.patches[cols].tolist() == [1, 0]  # row-major
    x0, y0, x1, y1 = encoded.boxes.T
    assert x0.min() == 0 and y0.min() == 0 and x1.max() == 333 and y1.max() == 250
    assert int(((x1 - x0) * (y1 - y0)).sum()) == 333 * 250
    assert np.allclose(np.linalg.norm(encoded.vectors, axis=1), 1.0, atol=1e-5)


def test_rope_positions_match_transformers_get_rope_index(encoder, reference, pages) -> None:
    model, processor = reference
    batch = processor.process_images(pages[:3])
    theirs, _ = model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                     attention_mask=batch["attention_mask"])
    prepared = encoder.prepare_images(pages[:3])
    feeds, _ = qwen2_vl_feeds(prepared, encoder.image_spec, int(processor.tokenizer.pad_token_id), "left")
    assert np.array_equal(feeds["input_ids"], batch["input_ids"].numpy())
    assert np.array_equal(feeds["position_ids"], theirs.numpy())


def test_serving_path_imports_no_torch_or_transformers(report, tmp_path: Path) -> None:
    script = f"""
import sys
from PIL import Image
from colgrid_server.encoders import load_multimodal_encoder
encoder = load_multimodal_encoder({str(report.path)!r}, threads=1)
encoder.encode_queries(["a chart"])
encoder.encode_images([Image.new("RGB", (90, 60), (200, 10, 10))])
print([m for m in ("torch", "transformers", "colpali_engine") if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


# -------------------------------------------------------------------------------- bad inputs

def test_a_non_image_is_invalid_with_its_position(encoder: MultimodalEncoder, pages) -> None:
    with pytest.raises(InvalidArgument) as err:
        encoder.encode_images([pages[0], b"\x89PNG not decoded"])
    assert err.value.field == "images[1]"


def test_one_image_instead_of_a_list_is_invalid(encoder: MultimodalEncoder, pages) -> None:
    with pytest.raises(InvalidArgument, match="sequence of PIL images"):
        encoder.encode_images(pages[0])


def test_an_image_flatter_than_200_to_1_is_invalid(encoder: MultimodalEncoder) -> None:
    with pytest.raises(InvalidArgument, match="aspect ratio") as err:
        encoder.encode_images([Image.new("RGB", (6000, 20))])
    assert err.value.field == "images[0]"


def test_an_empty_query_is_invalid(encoder: MultimodalEncoder) -> None:
    with pytest.raises(InvalidArgument) as err:
        encoder.encode_queries(["chart", "   "])
    assert err.value.field == "texts[1]"


def test_an_overlong_query_keeps_its_suffix(encoder: MultimodalEncoder) -> None:
    (encoded,) = encoder.encode_queries(["profit " * 2000])
    assert len(encoded.tokens) == encoder.spec.query_max_length
    assert encoded.tokens[-10:] == ["<|endoftext|>"] * 10


def test_text_loader_refuses_a_multimodal_encoder(report) -> None:
    with pytest.raises(FailedPrecondition, match="colqwen2"):
        load_encoder(report.path)


def test_multimodal_loader_refuses_a_text_encoder(tmp_path: Path) -> None:
    from colgrid_server.encoders import EncoderSpec, write_spec

    write_spec(tmp_path, EncoderSpec(kind="colbert", name="text", dim=16))
    with pytest.raises(FailedPrecondition, match="load_encoder"):
        load_multimodal_encoder(tmp_path)
