"""encoder.json and an encoder directory's identity."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from colgrid_server.encoders import EncoderSpec, ParityFigures, encoder_id, load_encoder, load_spec, write_spec
from colgrid_server.errors import FailedPrecondition, InvalidArgument, NotFound


def _spec(**changes) -> EncoderSpec:
    values = {"kind": "colbert", "name": "tiny", "dim": 16} | changes
    return EncoderSpec(**values)


def test_spec_round_trips_through_encoder_json(tmp_path: Path) -> None:
    spec = _spec(query_marker="[unused0] ", query_augment=True,
                 parity=ParityFigures(min_token_cosine=0.99999, max_abs_diff=3e-7, texts=5, tokens=300))
    write_spec(tmp_path, spec)
    assert load_spec(tmp_path) == spec


def test_spec_defaults_suit_minilm_used_colbert_style() -> None:
    spec = _spec()
    assert (spec.query_max_length, spec.document_max_length) == (32, 256)
    assert (spec.query_marker, spec.document_marker, spec.query_augment) == ("", "", False)
    assert spec.normalize and spec.skip_special_tokens


def test_missing_encoder_json_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_spec(tmp_path)


def test_unreadable_encoder_json_is_failed_precondition(tmp_path: Path) -> None:
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="re-export"):
        load_spec(tmp_path)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    raw = dataclasses.asdict(_spec()) | {"format_version": 99}
    (tmp_path / "encoder.json").write_text(json.dumps(raw))
    with pytest.raises(FailedPrecondition, match="format_version 99"):
        load_spec(tmp_path)


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    raw = dataclasses.asdict(_spec()) | {"pooling": "mean"}
    (tmp_path / "encoder.json").write_text(json.dumps(raw))
    with pytest.raises(FailedPrecondition, match="pooling"):
        load_spec(tmp_path)


def test_unknown_kind_is_invalid() -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(kind="splade")
    assert err.value.field == "kind"


def test_file_names_cannot_leave_the_directory() -> None:
    with pytest.raises(InvalidArgument) as err:
        _spec(query_onnx="../elsewhere/model.onnx")
    assert err.value.field == "query_onnx"


def test_identity_is_a_sha256_hex_digest(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    ident = encoder_id(tmp_path)
    assert len(ident) == 64 and int(ident, 16) >= 0


def test_identity_changes_when_a_file_changes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    before = encoder_id(tmp_path)
    (tmp_path / "a.txt").write_text("b")
    assert encoder_id(tmp_path) != before


def test_identity_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    before = encoder_id(tmp_path)
    (tmp_path / "a.txt").rename(tmp_path / "b.txt")
    assert encoder_id(tmp_path) != before


def test_identity_does_not_confuse_content_moved_between_files(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    (first / "a").write_text("xy"), (first / "b").write_text("z")
    (second / "a").write_text("x"), (second / "b").write_text("yz")
    assert encoder_id(first) != encoder_id(second)


def test_identity_is_stable_across_loads(encoder_dir: Path, text_encoder) -> None:
    assert encoder_id(encoder_dir) == text_encoder.id
    assert load_encoder(encoder_dir).id == text_encoder.id


def test_identity_of_a_copy_matches_and_an_edit_changes_it(encoder_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(encoder_dir, copy)
    assert encoder_id(copy) == encoder_id(encoder_dir)
    spec = load_spec(copy)
    write_spec(copy, dataclasses.replace(spec, query_max_length=spec.query_max_length + 1))
    assert encoder_id(copy) != encoder_id(encoder_dir)
