"""Export ColQwen2 (and ColPali) checkpoints through colpali-engine to an encoder directory.

The directory holds `text.onnx` (queries and text documents), `image.onnx` (page images),
`tokenizer.json` and `encoder.json` with every preprocessing parameter. Export ends with two
parity checks against the PyTorch model on sample images of several sizes and aspect ratios
and a padded batch of queries: the graphs on the processor's own inputs, and the whole serving
path (numpy/Pillow preprocessing + ONNX Runtime) against processor + PyTorch. Everything is
written to a temporary sibling directory renamed into place at the end.

torch, transformers and colpali-engine are imported only when an export runs.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from colgrid_server.encoders import _onnx_files
from colgrid_server.encoders.export_text import _fsync_tree, _publish, _require_free, _sha256_files, _tokenizer_json
from colgrid_server.encoders.spec import EncoderSpec, ImageParity, ImageSpec, ParityFigures, encoder_id, write_spec
from colgrid_server.errors import ColgridError, EncoderError, InvalidArgument

if TYPE_CHECKING:
    from colgrid_server.encoders._families import Family

TEXT_ONNX = "text.onnx"
IMAGE_ONNX = "image.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "token_vectors"

# Parity queries: a word to a paragraph, digits, punctuation and non-ASCII, padded together.
PARITY_QUERIES = (
    "line chart",
    "Which page shows the quarterly profit margins table for 2023?",
    "Zürich café revenue — 42 % of 1,337 (naïve estimate)",
    " ".join(["scanned invoice with a handwritten total and a company stamp"] * 6),
)
_TRACE_QUERIES = ("trace sample", "a second, longer trace sample query")


@dataclass(frozen=True)
class MultimodalExportReport:
    encoder_id: str
    path: Path
    kind: str
    query_min_cosine: float  # text graph vs PyTorch, and the serving path (same inputs: identical)
    query_max_abs_diff: float
    image_min_cosine: float  # image graph vs PyTorch on the processor's pixels
    image_max_abs_diff: float
    end_to_end_min_cosine: float  # numpy/Pillow preprocessing + ONNX vs processor + PyTorch
    preprocess_max_abs_diff: float
    image_sizes: tuple[tuple[int, int], ...]
    merged_adapter: bool
    export_seconds: float  # writing the ONNX graphs
    parity_seconds: float
    seconds: float


def sample_images(spec: ImageSpec, seed: int = 0) -> list[Image.Image]:
    """Parity images: one needing no resize, a tall and a wide one needing it, one larger than
    the model's pixel budget; drawn with text-like strokes, a chart line and noise."""
    block = spec.patch_size * spec.merge_size
    if spec.resize == "fixed":
        sizes = [(spec.width, spec.height), (211, 97), (97, 300), (spec.width * 2 + 33, spec.height + 7)]
    else:
        side = int(spec.max_pixels ** 0.5)
        sizes = [(3 * block, 2 * block), (97, 211), (int(side * 1.8), int(side * 0.6)),
                 (int(side * 1.3), int(side * 1.6))]
    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        base = rng.integers(180, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(base)
        draw = ImageDraw.Draw(image)
        for line in range(2, height // 12):
            draw.line([(4, line * 12), (int(width * rng.uniform(0.3, 0.95)), line * 12)], fill=(20, 20, 20), width=2)
        points = [(x, int(height * (0.8 - 0.6 * rng.random()))) for x in range(0, width, max(width // 8, 1))]
        draw.line(points, fill=(200, 30, 30), width=3)
        images.append(image)
    return images


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def export_multimodal(kind: str, checkpoint: str | Path, out_dir: Path, *, name: str | None = None,
                      base_model: str | Path | None = None, query_max_length: int = 512,
                      document_max_length: int = 2048, source: str | None = None,
                      min_token_cosine: float = 0.999, min_end_to_end_cosine: float = 0.99,
                      progress: bool = True) -> MultimodalExportReport:
    """Export a ColQwen2 (`kind="colqwen2"`) or ColPali (`kind="colpali"`) checkpoint (a local
    directory, or a LoRA adapter directory over a base: merged first) to `out_dir`, which must not
    exist or be empty.

    Fails with EncoderError, writing nothing, when any real vector of the graphs (queries, image
    patches) is below `min_token_cosine` against PyTorch, or when the serving path (numpy/Pillow
    preprocessing + ONNX) is below `min_end_to_end_cosine` on any image patch (it differs from the
    processor only by its resize filter) or `min_token_cosine` on any query token.
    """
    from colgrid_server.encoders._families import FAMILIES

    started = time.perf_counter()
    if kind not in FAMILIES:
        raise InvalidArgument(f"multimodal export handles {sorted(FAMILIES)}, got {kind!r}", field="kind")
    family = FAMILIES[kind]
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not ((checkpoint / "config.json").is_file() or (checkpoint / "adapter_config.json").is_file()):
        raise InvalidArgument(f"{checkpoint} is not a local Hugging Face checkpoint or LoRA adapter "
                              "(no config.json or adapter_config.json)", field="checkpoint")
    _require_free(out_dir)
    label = name or checkpoint.name
    EncoderSpec(kind="colbert", name=label, dim=1, query_max_length=query_max_length,
                document_max_length=document_max_length)  # argument errors before minutes of loading
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    steps = tqdm(total=6, desc=f"export {label}", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("loading checkpoint")
        loaded = family.load(checkpoint, base_model)
        model, processor = loaded.model, loaded.processor
        steps.update()

        steps.set_postfix_str("writing tokenizer")
        prefix, suffix = family.query_affixes(processor)
        tokenizer_json = _tokenizer_json(processor.tokenizer, document_max_length, ())
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        image_spec = family.image_spec(processor, model)
        dim = int(model.custom_text_proj.out_features)
        spec = EncoderSpec(
            kind=kind, name=label, dim=dim, query_max_length=query_max_length,
            document_max_length=document_max_length, query_marker=prefix, query_suffix=suffix,
            document_marker=family.text_prefix(processor),
            skip_special_tokens=False, padding_side=family.padding_side(processor), query_onnx=TEXT_ONNX,
            document_onnx=TEXT_ONNX, tokenizer_file=TOKENIZER_FILE, output_name=OUTPUT_NAME,
            source=source or loaded.source, source_sha256=_sha256_files(loaded.weight_files),
            exported_with=_versions(), image=image_spec)
        steps.update()

        steps.set_postfix_str("exporting ONNX")
        export_started = time.perf_counter()
        extra = _export_graphs(family, model, processor, spec, tmp)
        spec = replace(spec, extra_files=extra)
        write_spec(tmp, spec)
        export_seconds = time.perf_counter() - export_started
        steps.update()

        steps.set_postfix_str("checking graph parity")
        parity_started = time.perf_counter()
        images = sample_images(image_spec)
        torch_queries, query_batch = _torch_queries(model, processor, prefix, suffix)
        torch_images, image_batch = _torch_images(model, processor, images)
        query_parity = _graph_query_parity(tmp, spec, query_batch, torch_queries)
        image_parity = _graph_image_parity(family, tmp, spec, processor, image_batch, torch_images, images)
        for what, figure in (("query token", query_parity.min_token_cosine),
                             ("image patch", image_parity.min_patch_cosine)):
            if not figure >= min_token_cosine:  # also catches NaN
                raise EncoderError(f"ONNX/PyTorch parity failed for {checkpoint}: min {what} cosine {figure:.7f} "
                                   f"< {min_token_cosine}; the graph does not reproduce the model, so nothing "
                                   "was written")
        steps.update()

        steps.set_postfix_str("checking the serving path")
        served_query, image_parity = _serving_parity(tmp, spec, query_batch, torch_queries, images, image_batch,
                                                     torch_images, processor, image_parity)
        if not served_query >= min_token_cosine:
            raise EncoderError(f"serving-path parity failed for {checkpoint}: min query token cosine "
                               f"{served_query:.7f} < {min_token_cosine}; nothing was written")
        if not image_parity.end_to_end_min_cosine >= min_end_to_end_cosine:
            raise EncoderError(f"serving-path parity failed for {checkpoint}: min image patch cosine "
                               f"{image_parity.end_to_end_min_cosine:.5f} < {min_end_to_end_cosine} (numpy/Pillow "
                               f"preprocessing differs from the processor by up to "
                               f"{image_parity.preprocess_max_abs_diff:.4f}); nothing was written")
        parity_seconds = time.perf_counter() - parity_started
        steps.update()

        steps.set_postfix_str("writing spec")
        spec = replace(spec, parity=query_parity, image=replace(image_spec, parity=image_parity))
        write_spec(tmp, spec)
        _fsync_tree(tmp)
        _publish(tmp, out_dir)
        steps.update()
    except ColgridError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # torch/transformers/onnx failures: one translation, with the cause chained
        shutil.rmtree(tmp, ignore_errors=True)
        raise EncoderError(f"export of {checkpoint} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        steps.close()
    return MultimodalExportReport(
        encoder_id=encoder_id(out_dir), path=out_dir, kind=kind, query_min_cosine=query_parity.min_token_cosine,
        query_max_abs_diff=query_parity.max_abs_diff, image_min_cosine=image_parity.min_patch_cosine,
        image_max_abs_diff=image_parity.max_abs_diff, end_to_end_min_cosine=image_parity.end_to_end_min_cosine,
        preprocess_max_abs_diff=image_parity.preprocess_max_abs_diff, image_sizes=image_parity.sizes,
        merged_adapter=loaded.merged_adapter, export_seconds=export_seconds, parity_seconds=parity_seconds,
        seconds=time.perf_counter() - started)


def export_colqwen2(checkpoint: str | Path, out_dir: Path, **options) -> MultimodalExportReport:
    """`export_multimodal("colqwen2", ...)`: vidore/colqwen2-v1.0 and other ColQwen2 checkpoints."""
    return export_multimodal("colqwen2", checkpoint, out_dir, **options)


def export_colpali(checkpoint: str | Path, out_dir: Path, **options) -> MultimodalExportReport:
    """`export_multimodal("colpali", ...)`: vidore/colpali-v1.3 and other ColPali checkpoints."""
    return export_multimodal("colpali", checkpoint, out_dir, **options)


# ---------------------------------------------------------------------------------- steps

def _versions() -> str:
    from importlib.metadata import version

    return (f"torch {version('torch')}, transformers {version('transformers')}, "
            f"colpali-engine {version('colpali-engine')}, opset 17")


def _to_numpy(batch) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in batch.items()}


def _export_graphs(family: Family, model, processor, spec: EncoderSpec, tmp: Path) -> tuple[str, ...]:
    """Write text.onnx and image.onnx into `tmp` (each exported in a folder of its own first, so
    per-tensor weight files of large models never mix); returns external data files written."""
    import torch

    from colgrid_server.encoders._torch_export import export_onnx

    queries = processor.process_queries(list(_TRACE_QUERIES))
    tokens = {0: "batch", 1: "tokens"}
    text_path = Path(tempfile.mkdtemp(prefix=".text-", dir=tmp)) / TEXT_ONNX
    sample = {"input_ids": queries["input_ids"], "attention_mask": queries["attention_mask"]}
    export_onnx(family.text_graph(model), sample, text_path, OUTPUT_NAME,
                {"input_ids": tokens, "attention_mask": tokens, OUTPUT_NAME: tokens})
    extra = _onnx_files.place_graph(text_path, tmp)
    # Two sizes in the trace batch, so padding is part of what gets traced.
    block = spec.image.patch_size * spec.image.merge_size
    trace_images = [Image.new("RGB", (2 * block, 2 * block), (128, 64, 32)),
                    Image.new("RGB", (4 * block, 3 * block), (16, 200, 90))]
    feeds, _ = family.processor_feeds(processor.process_images(trace_images), spec, _pad_id(processor),
                                      spec.padding_side)
    patches = {0: "batch", 1: "patches"}
    axes = {"input_ids": tokens, "attention_mask": tokens, "token_type_ids": tokens,
            "position_ids": {1: "batch", 2: "tokens"}, "pixel_values": patches, "patch_positions": patches,
            "patch_mask": patches, OUTPUT_NAME: tokens}
    if "pixel_values" in feeds and feeds["pixel_values"].ndim == 4:  # fixed-size images: (batch, 3, H, W)
        axes["pixel_values"] = {0: "batch"}
    image_path = Path(tempfile.mkdtemp(prefix=".image-", dir=tmp)) / IMAGE_ONNX
    export_onnx(family.image_graph(model), {name: torch.from_numpy(value) for name, value in feeds.items()},
                image_path, OUTPUT_NAME, {name: axes[name] for name in [*feeds, OUTPUT_NAME]})
    return extra + _onnx_files.place_graph(image_path, tmp)


def _pad_id(processor) -> int:
    return int(processor.tokenizer.pad_token_id)


def _torch_queries(model, processor, prefix: str, suffix: str):
    from colgrid_server.encoders._torch_export import run_torch

    batch = processor.process_queries(list(PARITY_QUERIES))
    return run_torch(model, batch), _to_numpy(batch)


def _torch_images(model, processor, images: Sequence[Image.Image]):
    from colgrid_server.encoders._torch_export import run_torch

    batch = processor.process_images(list(images))
    return run_torch(model, batch), batch


def _graph_query_parity(tmp: Path, spec: EncoderSpec, batch: dict[str, np.ndarray],
                        reference: np.ndarray) -> ParityFigures:
    from colgrid_server.encoders._session import CPU, create_session

    session = create_session(tmp / spec.query_onnx, providers=[CPU])
    (out,) = session.run([OUTPUT_NAME], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    real = batch["attention_mask"].astype(bool)
    return ParityFigures(min_token_cosine=float(_cosines(out, reference)[real].min()),
                         max_abs_diff=float(np.abs(out - reference)[real].max()),
                         texts=len(PARITY_QUERIES), tokens=int(real.sum()))


def _image_token_rows(input_ids: np.ndarray, image_token_id: int) -> list[np.ndarray]:
    return [np.flatnonzero(row == image_token_id) for row in input_ids]


def _graph_image_parity(family: Family, tmp: Path, spec: EncoderSpec, processor, batch, reference: np.ndarray,
                        images: Sequence[Image.Image]) -> ImageParity:
    from colgrid_server.encoders._session import CPU, create_session

    feeds, rows = family.processor_feeds(batch, spec, _pad_id(processor), spec.padding_side)
    if not np.array_equal(feeds["input_ids"], batch["input_ids"].numpy()):
        raise EncoderError("the image prompt recorded in encoder.json does not reproduce the processor's "
                           "input ids; this checkpoint's processor is not supported")
    session = create_session(tmp / spec.image.onnx, providers=[CPU])
    (out,) = session.run([OUTPUT_NAME], {i.name: feeds[i.name] for i in session.get_inputs()})
    ours = np.concatenate([out[i, r] for i, r in enumerate(rows)])
    theirs = np.concatenate([reference[i, r] for i, r in enumerate(rows)])
    return ImageParity(min_patch_cosine=float(_cosines(ours, theirs).min()),
                       max_abs_diff=float(np.abs(ours - theirs).max()), images=len(images), patches=len(ours),
                       sizes=tuple(tuple(image.size) for image in images))


def _serving_parity(tmp: Path, spec: EncoderSpec, query_batch: dict[str, np.ndarray], torch_queries: np.ndarray,
                    images: Sequence[Image.Image], image_batch, torch_images: np.ndarray, processor,
                    parity: ImageParity) -> tuple[float, ImageParity]:
    from colgrid_server.encoders._session import CPU
    from colgrid_server.encoders.onnx_multimodal import MultimodalEncoder

    encoder = MultimodalEncoder(tmp, spec, providers=[CPU])
    served = encoder.encode_queries(list(PARITY_QUERIES))
    query_cosines = []
    for i, encoded in enumerate(served):
        real = query_batch["attention_mask"][i].astype(bool)
        reference = torch_queries[i][real]
        if encoded.vectors.shape != reference.shape:
            raise EncoderError(f"the exported tokenizer gives query {i} {len(encoded.vectors)} tokens where the "
                               f"processor gives {len(reference)}; this checkpoint's tokenizer is not supported")
        query_cosines.append(_cosines(encoded.vectors, reference))
    prepared = encoder.prepare_images(images)
    reference_pixels = _processor_pixels(spec.kind, image_batch)
    preprocess_diff = 0.0
    for i, (ours, theirs) in enumerate(zip(prepared, reference_pixels)):
        if ours.pixels.shape != theirs.shape:
            raise EncoderError(f"serve-time preprocessing gives sample image {i} pixels of shape {ours.pixels.shape} "
                               f"where the processor gives {theirs.shape}")
        preprocess_diff = max(preprocess_diff, float(np.abs(ours.pixels - theirs).max()))
    encoded_images = encoder.encode_prepared(prepared)
    rows = _image_token_rows(image_batch["input_ids"].numpy(), spec.image.image_token_id)
    end_to_end = min(float(_cosines(e.vectors, torch_images[i, r]).min())
                     for i, (e, r) in enumerate(zip(encoded_images, rows)))
    return float(np.concatenate(query_cosines).min()), replace(
        parity, preprocess_max_abs_diff=preprocess_diff, end_to_end_min_cosine=end_to_end)


def _processor_pixels(kind: str, batch) -> list[np.ndarray]:
    """Per image, the processor's pixel values in the layout `prepare_image` produces."""
    pixels = batch["pixel_values"].numpy()
    if kind == "colqwen2":
        counts = batch["image_grid_thw"].numpy().prod(axis=1)
        return [pixels[i, :n] for i, n in enumerate(counts)]
    return list(pixels)
