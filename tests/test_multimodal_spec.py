"""encoder.json for multimodal encoders: the image section round-trips and is validated."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from colgrid_server.encoders import EncoderSpec, ImageParity, ImageSpec, load_spec, write_spec
from colgrid_server.errors import FailedPrecondition, InvalidArgument

IMAGE_TOKEN = 312


def _image(**changes) -> ImageSpec:
    values = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>Describe the image.",
              "prompt_ids": (309, IMAGE_TOKEN, 310, 288), "image_token": "<|image_pad|>",
              "image_token_id": IMAGE_TOKEN, "resize": "smart", "patch_size": 14, "merge_size": 2,
              "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 50176,
              "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)} | changes
    return ImageSpec(**values)


def _spec(**changes) -> EncoderSpec:
    values = {"kind": "colqwen2", "name": "tiny", "dim": 128, "query_onnx": "text.onnx",
              "document_onnx": "text.onnx", "query_suffix": "<|endoftext|>" * 10, "padding_side": "left",
              "skip_special_tokens": False, "image": _image()} | changes
    return EncoderSpec(**values)


def test_multimodal_spec_round_trips_through_encoder_json(tmp_path: Path) -> None:
    parity = ImageParity(min_patch_cosine=0.9999999, max_abs_diff=3e-7, images=4, patches=138,
                         sizes=((84, 56), (97, 211)), preprocess_max_abs_diff=0.015, end_to_end_min_cosine=0.99999)
    spec = _spec(image=_image(parity=parity), extra_files=("image.onnx.data",))
    write_spec(tmp_path, spec)
    assert load_spec(tmp_path) == spec


def test_multimodal_spec_lists_the_image_graph_and_external_data_among_its_files() -> None:
    spec = _spec(extra_files=("image.onnx.data",))
    assert spec.files() == ("tokenizer.json", "text.onnx", "image.onnx", "image.onnx.data")


def test_text_spec_written_before_multimodal_fields_still_loads(tmp_path: Path) -> None:
    raw = dataclasses.asdict(EncoderSpec(kind="colbert", name="old", dim=16))
    for key in ("query_suffix", "padding_side", "image", "extra_files"):
        raw.pop(key)
    (tmp_path / "encoder.json").write_text(json.dumps(raw))
    spec = load_spec(tmp_path)
    assert (spec.image, spec.padding_side, spec.query_suffix, spec.multimodal) == (None, "right", "", False)


def test_multimodal_kind_without_an_image_section_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(image=None)
    assert err.value.field == "image"


def test_text_kind_with_an_image_section_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(kind="colbert")
    assert err.value.field == "image"


def test_prompt_must_hold_the_image_token_exactly_once() -> None:
    with pytest.raises(InvalidArgument) as err:
        _image(prompt_ids=(309, IMAGE_TOKEN, IMAGE_TOKEN, 310))
    assert err.value.field == "image.prompt_ids"


def test_padding_side_is_left_or_right() -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(padding_side="middle")
    assert err.value.field == "padding_side"


def test_smart_resize_needs_a_pixel_range() -> None:
    with pytest.raises(InvalidArgument, match="min_pixels"):
        _image(min_pixels=60000, max_pixels=50000)


def test_fixed_resize_needs_sides_divisible_by_the_patch() -> None:
    with pytest.raises(InvalidArgument, match="multiples of 14"):
        _image(resize="fixed", merge_size=1, temporal_patch_size=1, height=450, width=448)


def test_unknown_resample_filter_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        _image(resample="mks2021")
    assert err.value.field == "image.resample"


def test_image_graph_name_cannot_leave_the_directory() -> None:
    with pytest.raises(InvalidArgument):
        _image(onnx="../image.onnx")


def test_unknown_keys_in_the_image_section_are_refused(tmp_path: Path) -> None:
    raw = json.loads(_spec().to_json())
    raw["image"]["crop"] = True
    (tmp_path / "encoder.json").write_text(json.dumps(raw))
    with pytest.raises(FailedPrecondition, match="re-export"):
        load_spec(tmp_path)
