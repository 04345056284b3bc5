"""Reading precomputed vectors from files: .npy pairs and safetensors, ids and metadata beside
them. Files are written with numpy and the safetensors package (the formats' own writers)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from colgrid_server.errors import InvalidArgument
from colgrid_server.index import BFloat16Rows, build_version_from_arrays, load_vector_files, open_version

DIM = 8
LENGTHS = [3, 1, 4, 2]


@pytest.fixture()
def vectors() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(4)
    tokens = rng.standard_normal((sum(LENGTHS), DIM)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    return tokens, offsets, ["alpha", "beta", "gamma", "delta"]


def _npy_dir(root: Path, tokens, offsets, ids, *, ids_format: str = "txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "tokens.npy", tokens)
    np.save(root / "doc_offsets.npy", offsets)
    if ids_format == "txt":
        (root / "doc_ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    else:
        (root / "doc_ids.json").write_text(json.dumps(ids), encoding="utf-8")
    return root


def test_npy_directory_is_memory_mapped_with_ids_and_metadata(tmp_path, vectors):
    tokens, offsets, ids = vectors
    root = _npy_dir(tmp_path / "in", tokens, offsets, ids)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"i": i}) for i in range(4)) + "\n")
    found = load_vector_files(root)
    assert isinstance(found.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(found.tokens), tokens)
    np.testing.assert_array_equal(found.doc_offsets, offsets)
    assert found.doc_offsets.dtype == np.int64
    assert found.doc_ids == ids
    assert found.metadata == [{"i": i} for i in range(4)]
    assert {p.name for p in found.sources} == {"tokens.npy", "doc_offsets.npy", "doc_ids.txt", "metadata.jsonl"}


def test_files_build_a_searchable_version(tmp_path, vectors):
    tokens, offsets, ids = vectors
    found = load_vector_files(_npy_dir(tmp_path / "in", tokens, offsets, ids))
    summary = build_version_from_arrays(
        tmp_path / "v", tokens=found.tokens, doc_offsets=found.doc_offsets, doc_ids=found.doc_ids,
        metadata=found.metadata, normalized=True, build_params={"n_centroids": 2},
    )  # fmt: skip
    loaded = open_version(summary.path)
    assert loaded.doc_ids == ids
    np.testing.assert_array_equal(loaded.tokens.numpy(), tokens.astype(np.float16))


def test_a_tokens_npy_path_finds_its_companions(tmp_path, vectors):
    tokens, offsets, ids = vectors
    root = _npy_dir(tmp_path / "in", tokens, offsets.astype(np.int32), ids, ids_format="json")
    found = load_vector_files(root / "tokens.npy")
    assert found.doc_ids == ids and found.metadata is None
    assert found.doc_offsets.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_safetensors_file_is_read_in_its_own_float_type(tmp_path, vectors, dtype):
    tokens, offsets, ids = vectors
    save_numpy({"tokens": tokens.astype(dtype), "doc_offsets": offsets.astype(np.int32)}, str(tmp_path / "vectors.safetensors"))
    (tmp_path / "doc_ids.json").write_text(json.dumps(ids))
    found = load_vector_files(tmp_path / "vectors.safetensors")
    assert np.asarray(found.tokens).dtype == dtype
    np.testing.assert_array_equal(np.asarray(found.tokens), tokens.astype(dtype))
    np.testing.assert_array_equal(found.doc_offsets, offsets)


def test_bfloat16_safetensors_from_torch_decode_exactly(tmp_path, vectors):
    tokens, offsets, ids = vectors
    bf16 = torch.from_numpy(tokens).to(torch.bfloat16)
    save_torch({"tokens": bf16, "doc_offsets": torch.from_numpy(offsets)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "doc_ids.txt").write_text("\n".join(ids))  # no final newline
    found = load_vector_files(tmp_path)  # the directory's only .safetensors file
    assert isinstance(found.tokens, BFloat16Rows)
    assert found.tokens.shape == tokens.shape
    np.testing.assert_array_equal(found.tokens[2:5], bf16[2:5].to(torch.float32).numpy())
    assert found.doc_ids == ids


def test_safetensors_without_a_tokens_tensor_is_refused_naming_it(tmp_path, vectors):
    tokens, offsets, ids = vectors
    save_numpy({"embeddings": tokens, "doc_offsets": offsets}, str(tmp_path / "x.safetensors"))
    (tmp_path / "doc_ids.json").write_text(json.dumps(ids))
    with pytest.raises(InvalidArgument, match="no tensor 'tokens'.*embeddings") as info:
        load_vector_files(tmp_path / "x.safetensors")
    assert info.value.field == "tokens"


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidArgument, match="not a safetensors file") as info:
        load_vector_files(tmp_path / "x.safetensors")
    assert info.value.field == "path"


def test_safetensors_data_offsets_past_the_end_are_refused(tmp_path, vectors):
    tokens, offsets, ids = vectors
    path = tmp_path / "x.safetensors"
    save_numpy({"tokens": tokens, "doc_offsets": offsets}, str(path))
    path.write_bytes(path.read_bytes()[:-16])  # truncated
    with pytest.raises(InvalidArgument, match="data_offsets"):
        load_vector_files(path)


@pytest.mark.parametrize(
    ("remove", "field", "message"),
    [
        ("doc_ids.txt", "doc_ids", "neither doc_ids.txt nor doc_ids.json"),
        ("doc_offsets.npy", "doc_offsets", "doc_offsets.npy is missing"),
        ("tokens.npy", "path", "expected tokens.npy"),
    ],
)
def test_a_missing_file_is_named(tmp_path, vectors, remove, field, message):
    root = _npy_dir(tmp_path / "in", *vectors)
    (root / remove).unlink()
    with pytest.raises(InvalidArgument, match=message) as info:
        load_vector_files(root)
    assert info.value.field == field


def test_an_empty_line_in_the_ids_file_is_refused_naming_it(tmp_path, vectors):
    tokens, offsets, ids = vectors
    root = _npy_dir(tmp_path / "in", tokens, offsets, ids)
    (root / "doc_ids.txt").write_text("alpha\n\ngamma\ndelta\n")
    with pytest.raises(InvalidArgument, match="line 2 is empty"):
        load_vector_files(root)


def test_a_metadata_line_that_is_not_an_object_is_refused_naming_it(tmp_path, vectors):
    root = _npy_dir(tmp_path / "in", *vectors)
    (root / "metadata.jsonl").write_text('{"a": 1}\n[1, 2]\n{}\n{}\n')
    with pytest.raises(InvalidArgument, match=r"metadata.jsonl:2: each line must be a JSON object") as info:
        load_vector_files(root)
    assert info.value.field == "metadata"


def test_a_pickled_npy_is_refused(tmp_path, vectors):
    root = _npy_dir(tmp_path / "in", *vectors)
    np.save(root / "doc_offsets.npy", np.array([0, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgument, match="not a readable .npy") as info:
        load_vector_files(root)
    assert info.value.field == "doc_offsets"


def test_a_path_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist") as info:
        load_vector_files(tmp_path / "nope")
    assert info.value.field == "path"
