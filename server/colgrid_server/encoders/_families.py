"""Per model family: how to load it, its graphs, and what its processor does (export only)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from colgrid_server.encoders._image_feeds import paligemma_feeds, qwen2_vl_feeds
from colgrid_server.encoders.image_preprocess import PreparedImage
from colgrid_server.encoders.spec import RESAMPLE_FILTERS, EncoderSpec, ImageSpec
from colgrid_server.errors import EncoderError

QUERY_AUGMENTATION_TOKENS = 10  # colpali-engine's process_queries appends this many


@dataclass(frozen=True)
class Family:
    """What differs between model families; the export steps around it are shared."""

    kind: str
    load: Callable  # (checkpoint, base_model) -> loaded (model, processor, weight_files, merged_adapter)
    text_graph: Callable  # model -> nn.Module(input_ids, attention_mask)
    image_graph: Callable  # model -> nn.Module(**image feeds)
    image_spec: Callable  # (processor, model) -> ImageSpec
    text_prefix: Callable  # processor -> text its processor puts before every text (documents too)
    query_affixes: Callable  # processor -> (prefix, suffix) around queries
    padding_side: Callable  # processor -> "left" | "right"
    processor_feeds: Callable  # (processor batch, spec, pad_id, padding_side) -> (feeds, image rows)


def _resample_name(image_processor) -> str:
    from transformers.image_utils import PILImageResampling

    name = PILImageResampling(int(image_processor.resample)).name.lower()
    if name not in RESAMPLE_FILTERS:
        raise EncoderError(f"the image processor resizes with {name}, which serving does not reproduce")
    return name


def _check_steps(image_processor) -> None:
    for step in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if getattr(image_processor, step, True) is False:
            raise EncoderError(f"the image processor has {step}=False; serving always does that step, so this "
                               "checkpoint's processor is not supported")


def _collapse_image_run(ids: np.ndarray, image_token_id: int) -> tuple[int, ...]:
    """The processor's ids for one image with the run of image tokens collapsed to one."""
    at = np.flatnonzero(ids == image_token_id)
    if len(at) == 0 or not np.array_equal(at, np.arange(at[0], at[0] + len(at))):
        raise EncoderError("the processor's image prompt does not hold one run of image tokens")
    return tuple(int(i) for i in np.concatenate([ids[: at[0] + 1], ids[at[-1] + 1:]]))


# ------------------------------------------------------------------------------- ColQwen2

def _qwen2_image_spec(processor, model) -> ImageSpec:
    image_processor = processor.image_processor
    _check_steps(image_processor)
    image_token_id = int(model.config.image_token_id)
    block = image_processor.patch_size * image_processor.merge_size
    probe = processor.process_images([Image.new("RGB", (2 * block, 2 * block), (255, 255, 255))])
    size = image_processor.size
    vision = model.visual.config
    if (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) != (
            image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size):
        raise EncoderError("the image processor's patch, merge or temporal size differs from the model's")
    return ImageSpec(
        prompt=processor.visual_prompt_prefix, prompt_ids=_collapse_image_run(probe["input_ids"][0].numpy(),
                                                                               image_token_id),
        image_token=processor.image_token, image_token_id=image_token_id, resize="smart",
        patch_size=int(image_processor.patch_size), merge_size=int(image_processor.merge_size),
        temporal_patch_size=int(image_processor.temporal_patch_size), min_pixels=int(size["shortest_edge"]),
        max_pixels=int(size["longest_edge"]), resample=_resample_name(image_processor),
        rescale_factor=float(image_processor.rescale_factor), mean=tuple(float(v) for v in image_processor.image_mean),
        std=tuple(float(v) for v in image_processor.image_std), onnx="image.onnx")


def _qwen2_processor_feeds(batch, spec: EncoderSpec, pad_id: int, padding_side: str):
    """Image graph feeds from the processor's own pixels and grids (graph parity, tracing)."""
    grids = batch["image_grid_thw"].numpy()
    pixels = batch["pixel_values"].numpy()
    prepared = [PreparedImage(pixels=pixels[i, : int(t * h * w)], grid=(int(h), int(w)), size=(0, 0), resized=(0, 0))
                for i, (t, h, w) in enumerate(grids)]
    return qwen2_vl_feeds(prepared, spec.image, pad_id, padding_side)


def _colqwen2() -> Family:
    def load(checkpoint, base_model):
        from colgrid_server.encoders._torch_qwen2_vl import load_colqwen2

        return load_colqwen2(checkpoint, base_model)

    def text_graph(model):
        from colgrid_server.encoders._torch_qwen2_vl import TextGraph

        return TextGraph(model)

    def image_graph(model):
        from colgrid_server.encoders._torch_qwen2_vl import ImageGraph

        return ImageGraph(model)

    return Family(kind="colqwen2", load=load, text_graph=text_graph, image_graph=image_graph,
                   image_spec=_qwen2_image_spec, text_prefix=lambda p: "",
                   query_affixes=lambda p: (p.query_prefix, p.query_augmentation_token * QUERY_AUGMENTATION_TOKENS),
                   padding_side=lambda p: p.tokenizer.padding_side, processor_feeds=_qwen2_processor_feeds)


# -------------------------------------------------------------------------------- ColPali

def _paligemma_image_spec(processor, model) -> ImageSpec:
    image_processor = processor.image_processor
    _check_steps(image_processor)
    image_token_id = int(processor.image_token_id)
    size = image_processor.size
    height, width = int(size["height"]), int(size["width"])
    patch = int(model.model.model.vision_tower.config.patch_size)
    if (height // patch) * (width // patch) != processor.image_seq_length:
        raise EncoderError(f"the processor puts {processor.image_seq_length} image tokens in a prompt but "
                           f"{height}x{width} images make {(height // patch) * (width // patch)} patches")
    probe = processor.process_images([Image.new("RGB", (width, height), (255, 255, 255))])
    ids = probe["input_ids"][0].numpy()
    prompt_ids = _collapse_image_run(ids, image_token_id)
    types = probe["token_type_ids"][0].numpy()
    at = int(np.flatnonzero(ids == image_token_id)[0])
    prompt_types = tuple(int(t) for t in np.concatenate([types[: at + 1], types[at + processor.image_seq_length:]]))
    return ImageSpec(
        prompt=processor.visual_prompt_prefix, prompt_ids=prompt_ids, prompt_type_ids=prompt_types,
        image_token=processor.image_token, image_token_id=image_token_id, resize="fixed", patch_size=patch,
        merge_size=1, temporal_patch_size=1, height=height, width=width, resample=_resample_name(image_processor),
        rescale_factor=float(image_processor.rescale_factor), mean=tuple(float(v) for v in image_processor.image_mean),
        std=tuple(float(v) for v in image_processor.image_std), onnx="image.onnx")


def _paligemma_processor_feeds(batch, spec: EncoderSpec, pad_id: int, padding_side: str):
    pixels = batch["pixel_values"].numpy()
    grid = (spec.image.height // spec.image.patch_size, spec.image.width // spec.image.patch_size)
    prepared = [PreparedImage(pixels=p, grid=grid, size=(0, 0), resized=(0, 0)) for p in pixels]
    return paligemma_feeds(prepared, spec.image, pad_id, padding_side)


def _colpali() -> Family:
    def load(checkpoint, base_model):
        from colgrid_server.encoders._torch_paligemma import load_colpali

        return load_colpali(checkpoint, base_model)

    def text_graph(model):
        from colgrid_server.encoders._torch_paligemma import TextGraph

        return TextGraph(model)

    def image_graph(model):
        from colgrid_server.encoders._torch_paligemma import ImageGraph

        return ImageGraph(model)

    return Family(kind="colpali", load=load, text_graph=text_graph, image_graph=image_graph,
                   image_spec=_paligemma_image_spec,
                   # process_texts prepends <bos> to every text, queries (after query_prefix) included.
                   text_prefix=lambda p: p.tokenizer.bos_token,
                   query_affixes=lambda p: (p.tokenizer.bos_token + p.query_prefix,
                                            p.query_augmentation_token * QUERY_AUGMENTATION_TOKENS),
                   padding_side=lambda p: p.tokenizer.padding_side, processor_feeds=_paligemma_processor_feeds)


FAMILIES: dict[str, Family] = {"colqwen2": _colqwen2(), "colpali": _colpali()}
