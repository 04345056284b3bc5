"""entropy4 / entropy2: Rice-coded blocks decode to exactly the integers encoded, the size stays
within the budget (a quarter / an eighth of fp16), and damaged blocks are corruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from colgrid_server.errors import CorruptVersion
from colgrid_server.index import MANIFEST_NAME, DenseTokens, open_version, verify_version
from colgrid_server.index._entropy import (
    ESCAPE_QUOTIENT,
    EntropyModel,
    decode_block,
    encode_block,
    estimated_bits_per_token,
    fit_entropy_model,
)
from colgrid_server.index._manifest import write_manifest
from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version


def _model(dim: int, *, step: float = 0.05, seed: int = 0, k: int | None = None) -> EntropyModel:
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = rng.uniform(0.2, 2.0, dim).astype(np.float32)
    rice_k = np.full(dim, 2 if k is None else k, dtype=np.uint8) if k is not None else rng.integers(0, 6, dim).astype(np.uint8)
    return EntropyModel(rotation=rotation.astype(np.float32), scale=scale, step=step, rice_k=rice_k)


def _round_trip(residuals: np.ndarray, model: EntropyModel) -> tuple[np.ndarray, np.ndarray]:
    data, unary = encode_block(residuals, model)
    return decode_block(data, unary, residuals.shape[0], model), model.residuals(model.symbols(residuals))


@pytest.mark.parametrize(("dim", "rows"), [(1, 1), (7, 3), (24, 500), (128, 2000), (13, 1)])
def test_a_block_decodes_to_exactly_the_encoded_integers(dim, rows):
    model = _model(dim, seed=dim)
    residuals = np.random.default_rng(rows).normal(0, 0.3, (rows, dim)).astype(np.float32)
    decoded, expected = _round_trip(residuals, model)
    np.testing.assert_array_equal(decoded, expected)


def test_decoded_residuals_are_within_half_a_step_per_weighted_coordinate():
    model = _model(32, step=0.01)
    residuals = np.random.default_rng(1).normal(0, 0.2, (300, 32)).astype(np.float32)
    decoded, _ = _round_trip(residuals, model)
    weighted_error = ((decoded - residuals) @ model.rotation) * model.scale
    assert np.abs(weighted_error).max() <= model.step / 2 * (1 + 1e-3) + 1e-6


def test_values_far_beyond_the_fitted_range_take_the_escape_and_round_trip():
    model = _model(16, k=1)
    residuals = np.random.default_rng(2).normal(0, 0.1, (200, 16)).astype(np.float32)
    residuals[17] *= 1e4  # quotients far over the escape threshold
    residuals[150, 3] = -5e3
    data, unary = encode_block(residuals, model)
    assert np.any(_zigzag_quotients(residuals, model) >= ESCAPE_QUOTIENT)
    np.testing.assert_array_equal(decode_block(data, unary, 200, model), model.residuals(model.symbols(residuals)))


def _zigzag_quotients(residuals: np.ndarray, model: EntropyModel) -> np.ndarray:
    s = model.symbols(residuals)
    return np.where(s >= 0, 2 * s, -2 * s - 1) >> model.rice_k.astype(np.int64)


@pytest.mark.parametrize("k", [17, 18, 25])
def test_wide_rice_parameters_round_trip(k):
    # Past 17 bits a remainder no longer fits a 3-byte window at every bit offset.
    model = _model(6, step=1e-6, k=k)
    residuals = np.random.default_rng(k).normal(0, 2.0, (300, 6)).astype(np.float32)
    data, unary = encode_block(residuals, model)
    np.testing.assert_array_equal(decode_block(data, unary, 300, model), model.residuals(model.symbols(residuals)))


def test_all_zero_residuals_cost_one_bit_per_value_with_k_zero():
    model = _model(8, k=0)
    data, unary = encode_block(np.zeros((64, 8), np.float32), model)
    assert data.shape[0] == 8 * 8  # 64 one-bits per dimension, no remainders, no escapes
    np.testing.assert_array_equal(decode_block(data, unary, 64, model), np.zeros((64, 8), np.float32))


@pytest.mark.parametrize("damage", ["truncate", "extra byte", "unary length", "row count"])
def test_a_damaged_block_is_refused(damage):
    model = _model(12)
    residuals = np.random.default_rng(4).normal(0, 0.3, (100, 12)).astype(np.float32)
    data, unary = encode_block(residuals, model)
    rows = 100
    if damage == "truncate":
        data = data[:-3]
    elif damage == "extra byte":
        data = np.concatenate([data, np.zeros(1, np.uint8)])
    elif damage == "unary length":
        unary = unary.copy()
        unary[0] += 1
    else:
        rows = 99
    with pytest.raises(ValueError):
        decode_block(data, unary, rows, model)


@pytest.mark.parametrize("nbits", [4, 2])
def test_the_fitted_step_meets_the_budget_on_held_out_tokens(nbits):
    corpus = SyntheticCorpus(48, topics=40, noise=0.3, seed=5)
    tokens = corpus.vectors(12000).astype(np.float32)
    centroids = tokens[::97] / np.linalg.norm(tokens[::97], axis=1, keepdims=True)
    residuals = tokens - centroids[np.argmax(tokens @ centroids.T, axis=1)]
    model = fit_entropy_model(residuals[:6000], nbits, total_tokens=12000, fixed_bytes=0)
    held_out = (residuals[6000:] @ model.rotation) * model.scale
    bits = estimated_bits_per_token(held_out, model.step)
    assert 0.9 * nbits * 48 <= bits <= nbits * 48
    data, _ = encode_block(residuals[6000:], model)
    assert data.shape[0] * 8 / 6000 <= nbits * 48 * 1.01


def test_fewer_bits_mean_a_coarser_step():
    corpus = SyntheticCorpus(32, seed=8)
    tokens = corpus.vectors(4000).astype(np.float32)
    residuals = tokens - tokens.mean(axis=0)
    fine = fit_entropy_model(residuals, 4, total_tokens=4000, fixed_bytes=0)
    coarse = fit_entropy_model(residuals, 2, total_tokens=4000, fixed_bytes=0)
    assert coarse.step > 2 * fine.step


def test_the_rotation_follows_the_residuals_not_the_tokens_shared_direction():
    # Tokens share a large mean along axis 0; around their centroid they vary along axis 1.
    # The error that moves a score is read by a query token's deviation from the document
    # token it matches, which spreads like the residuals: the first axis must be axis 1.
    rng = np.random.default_rng(3)
    residuals = rng.normal(0, 0.01, (4000, 8)).astype(np.float32)
    residuals[:, 1] += rng.normal(0, 0.3, 4000).astype(np.float32)
    model = fit_entropy_model(residuals, 4, total_tokens=4000, fixed_bytes=0)
    assert abs(float(model.rotation[1, 0])) > 0.99
    assert abs(float(model.rotation[0, 0])) < 0.05


def test_the_weights_of_any_two_directions_differ_at_most_sqrt_dim_plus_one_fold():
    # The isotropic part of the weighting: directions the residuals barely use still get a
    # share of the precision (query tokens vary in them more than document tokens do).
    dim = 16
    rng = np.random.default_rng(4)
    residuals = (rng.normal(0, 1, (3000, dim)) * np.geomspace(1, 1e-4, dim)).astype(np.float32)
    model = fit_entropy_model(residuals, 4, total_tokens=3000, fixed_bytes=0)
    ratio = float(model.scale.max() / model.scale.min())
    assert 2.0 < ratio <= np.sqrt(dim + 1) * 1.001


# -- versions --------------------------------------------------------------------------------


DIM = 32


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(DIM, topics=50, noise=0.3, seed=13)


@pytest.fixture(scope="module")
def documents(corpus):
    return corpus.documents(700, max_tokens=60)


@pytest.fixture(scope="module")
def versions(tmp_path_factory, corpus, documents) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("entropy")
    for codec in ("fp16", "entropy4", "entropy2"):
        summary = write_synthetic_version(root / codec, documents, corpus.encoder, build_params={"codec": codec})
        assert summary.codec == codec
    return {codec: root / codec for codec in ("fp16", "entropy4", "entropy2")}


def _entropy_bytes_per_token(path: Path) -> float:
    """Every entropy array's files (model, offsets, coded blocks) per token."""
    group = zarr.open_group(str(path), mode="r")
    files = [p for p in path.iterdir() if p.is_dir() and p.name.startswith("entropy_")]
    assert {p.name for p in files} == {
        "entropy_bytes", "entropy_block_offsets", "entropy_unary_lengths", "entropy_rotation", "entropy_scales", "entropy_rice_k",
    }  # fmt: skip
    return sum(f.stat().st_size for p in files for f in p.rglob("*") if f.is_file()) / group.attrs["counts"]["tokens"]


@pytest.mark.parametrize(("codec", "fraction"), [("entropy4", 4), ("entropy2", 8)])
def test_an_entropy_version_takes_at_most_its_fraction_of_fp16_on_disk(versions, codec, fraction):
    assert _entropy_bytes_per_token(versions[codec]) <= 2 * DIM / fraction
    assert not (versions[codec] / "tokens").exists()  # the staged float16 copy is gone


@pytest.mark.parametrize("codec", ["entropy4", "entropy2"])
def test_an_entropy_version_verifies_and_decodes_at_load_whatever_the_layout_asked(versions, codec):
    assert len(verify_version(versions[codec])) == 64
    for keep_codes in (False, True):
        loaded = open_version(versions[codec], keep_codes=keep_codes)
        assert loaded.codec == codec and isinstance(loaded.store, DenseTokens)


def test_decoded_tokens_are_unit_vectors_close_to_the_originals(versions, documents):
    loaded = open_version(versions["entropy4"])
    decoded = loaded.tokens.to(torch.float32).numpy()
    original = np.concatenate([d.vectors for d in documents])
    assert np.allclose(np.linalg.norm(decoded, axis=1), 1.0, atol=2e-3)
    cosine = np.sum(decoded * original, axis=1)
    assert cosine.mean() > 0.99 and cosine.min() > 0.9


def test_entropy4_is_closer_to_the_originals_than_entropy2(versions, documents):
    original = np.concatenate([d.vectors for d in documents])
    errors = {c: np.linalg.norm(open_version(versions[c]).tokens.to(torch.float32).numpy() - original, axis=1).mean()
              for c in ("entropy4", "entropy2")}  # fmt: skip
    assert errors["entropy4"] < 0.6 * errors["entropy2"]


def _damaged_copy(tmp_path: Path, source: Path, edit) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(source, copy)
    edit(copy)
    (copy / MANIFEST_NAME).unlink()
    write_manifest(copy)  # a consistent manifest: the damage must be caught by decoding
    return copy


def test_a_block_that_does_not_decode_is_corruption_naming_the_block(tmp_path, versions):
    def edit(copy: Path) -> None:
        group = zarr.open_group(str(copy), mode="r+")
        unary = group["entropy_unary_lengths"][...]
        unary[0, 0] += 1
        group["entropy_unary_lengths"][...] = unary

    with pytest.raises(CorruptVersion, match="entropy block 0"):
        open_version(_damaged_copy(tmp_path, versions["entropy4"], edit))


def test_offsets_that_do_not_cover_the_bytes_are_corruption(tmp_path, versions):
    def edit(copy: Path) -> None:
        group = zarr.open_group(str(copy), mode="r+")
        offsets = group["entropy_block_offsets"][...]
        offsets[-1] -= 1
        group["entropy_block_offsets"][...] = offsets

    with pytest.raises(CorruptVersion, match="entropy_block_offsets"):
        open_version(_damaged_copy(tmp_path, versions["entropy4"], edit))


@pytest.mark.parametrize(("field", "value"), [("step", 0.0), ("step", "x"), ("block_rows", 0), ("nbits", 2)])
def test_a_codec_entry_with_a_bad_field_is_corruption(tmp_path, versions, field, value):
    def edit(copy: Path) -> None:
        meta = json.loads((copy / "zarr.json").read_text())
        meta["attributes"]["codec"][field] = value
        (copy / "zarr.json").write_text(json.dumps(meta))

    with pytest.raises(CorruptVersion, match="codec"):
        open_version(_damaged_copy(tmp_path, versions["entropy4"], edit))


def test_vectors_that_are_not_unit_length_round_trip_without_renormalising(tmp_path, corpus, documents):
    scaled = [type(d)(d.id, d.vectors * 3.0, d.spans, d.text) for d in documents[:200]]
    write_synthetic_version(tmp_path / "v", scaled, corpus.encoder, build_params={"codec": "entropy4"})
    loaded = open_version(tmp_path / "v")
    assert loaded.attrs["codec"]["renormalize"] is False
    decoded = loaded.tokens.to(torch.float32).numpy()
    original = np.concatenate([d.vectors for d in scaled])
    assert np.linalg.norm(decoded - original, axis=1).mean() < 0.1 * 3.0
