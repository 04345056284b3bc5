"""Compressed versions on disk: what each codec stores, its bytes per token, integrity, and the
decoded vectors both resident layouts serve."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from colgrid_server.errors import CorruptVersion, FailedPrecondition
from colgrid_server.index import MANIFEST_NAME, DenseTokens, Int8Tokens, ResidualTokens, open_version, verify_version
from colgrid_server.index._manifest import write_manifest
from colgrid_server.index.testing import SyntheticCorpus, write_synthetic_version

DIM = 24  # a multiple of 4: no padding bits in residual2; odd dims are tested separately
CODECS = ("fp16", "int8", "residual4", "residual2")
PAYLOAD_ARRAYS = {
    "fp16": {"tokens"},
    "int8": {"tokens_int8", "token_scales"},
    "residual4": {"residuals", "residual_cutoffs", "residual_weights"},
    "residual2": {"residuals", "residual_cutoffs", "residual_weights"},
}
ALL_PAYLOAD = set().union(*PAYLOAD_ARRAYS.values())


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(DIM, seed=41, noise=0.3)


@pytest.fixture(scope="module")
def documents(corpus):
    return corpus.documents(150, max_tokens=30)


@pytest.fixture(scope="module")
def versions(tmp_path_factory, corpus, documents) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codecs")
    for codec in CODECS:
        summary = write_synthetic_version(root / codec, documents, corpus.encoder, build_params={"codec": codec, "n_centroids": 32})
        assert summary.codec == codec
    return {codec: root / codec for codec in CODECS}


def _arrays(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir()}


def _payload_bytes_per_token(path: Path, codec: str) -> float:
    group = zarr.open_group(str(path), mode="r")
    n_tok = group.attrs["counts"]["tokens"]
    per_token = {"tokens", "tokens_int8", "token_scales", "residuals"}
    return sum(group[name].nbytes for name in PAYLOAD_ARRAYS[codec] & per_token) / n_tok


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_stores_only_its_own_token_arrays(versions, codec):
    arrays = _arrays(versions[codec])
    assert PAYLOAD_ARRAYS[codec] <= arrays
    assert not (ALL_PAYLOAD - PAYLOAD_ARRAYS[codec]) & arrays  # the staged float16 copy is gone
    attrs = json.loads((versions[codec] / "zarr.json").read_text())["attributes"]
    assert attrs["codec"]["name"] == codec == attrs["build_params"]["codec"]
    assert attrs["format_version"] == 2


@pytest.mark.parametrize(("codec", "expected"), [("fp16", 2 * DIM), ("int8", DIM + 4), ("residual4", DIM / 2), ("residual2", DIM / 4)])
def test_payload_bytes_per_token(versions, codec, expected):
    assert _payload_bytes_per_token(versions[codec], codec) == expected


def test_residual_codecs_take_at_most_a_quarter_of_fp16_and_int8_about_half(versions):
    fp16 = _payload_bytes_per_token(versions["fp16"], "fp16")
    assert _payload_bytes_per_token(versions["residual4"], "residual4") <= fp16 / 4
    assert _payload_bytes_per_token(versions["residual2"], "residual2") <= fp16 / 8
    assert _payload_bytes_per_token(versions["int8"], "int8") <= 0.6 * fp16


def test_token_codes_are_two_bytes_below_65537_centroids(versions):
    assert open_version(versions["fp16"]).token_codes.dtype == np.uint16


@pytest.mark.parametrize("codec", CODECS)
def test_every_codec_passes_verification_and_records_its_codec(versions, codec):
    assert len(verify_version(versions[codec])) == 64
    loaded = open_version(versions[codec])
    assert loaded.codec == codec and loaded.store.codec == codec


@pytest.mark.parametrize("codec", ["int8", "residual4", "residual2"])
def test_a_flipped_byte_in_a_compressed_payload_is_detected(tmp_path, versions, codec):
    copy = tmp_path / codec
    shutil.copytree(versions[codec], copy)
    name = "tokens_int8" if codec == "int8" else "residuals"
    chunk = next(p for p in sorted((copy / name / "c").rglob("*")) if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptVersion, match=name):
        open_version(copy)


def test_a_codec_array_missing_from_disk_and_manifest_is_corruption(tmp_path, versions):
    copy = tmp_path / "r4"
    shutil.copytree(versions["residual4"], copy)
    shutil.rmtree(copy / "residual_weights")
    (copy / MANIFEST_NAME).unlink()
    write_manifest(copy)
    with pytest.raises(CorruptVersion, match="array residual_weights is missing"):
        open_version(copy)


def test_a_codec_entry_that_contradicts_its_name_is_corruption(tmp_path, versions):
    copy = tmp_path / "r2"
    shutil.copytree(versions["residual2"], copy)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["codec"]["nbits"] = 4
    (copy / "zarr.json").write_text(json.dumps(meta))
    (copy / MANIFEST_NAME).unlink()
    write_manifest(copy)
    with pytest.raises(CorruptVersion, match="bit width"):
        open_version(copy)


def test_int8_decodes_within_half_a_step_of_the_stored_vectors(versions, documents):
    loaded = open_version(versions["int8"], keep_codes=True)
    assert isinstance(loaded.store, Int8Tokens)
    original = np.concatenate([d.vectors for d in documents]).astype(np.float16).astype(np.float32)
    decoded = loaded.store.decode(0, loaded.tokens_count).cpu().numpy()
    step = np.abs(original).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(decoded - original) <= step / 2 + 1e-6)


def test_int8_norm_bound_covers_every_decoded_token_and_stays_close(versions):
    loaded = open_version(versions["int8"], keep_codes=True)
    largest = float(torch.linalg.vector_norm(loaded.store.decode(0, loaded.tokens_count), dim=1).max())
    assert largest <= loaded.max_token_norm <= 1.1 * largest


@pytest.mark.parametrize("codec", ["residual4", "residual2"])
def test_residual_coordinates_are_bucket_values_around_the_centroid(tmp_path, corpus, documents, codec):
    # Vectors that are not unit length are not re-normalised: decoded - centroid is exactly
    # one of each dimension's bucket values.
    scaled = [type(d)(d.id, d.vectors * 2.0, d.spans, d.text) for d in documents[:60]]
    write_synthetic_version(tmp_path / "v", scaled, corpus.encoder, build_params={"codec": codec, "n_centroids": 16})
    loaded = open_version(tmp_path / "v", keep_codes=True)
    assert isinstance(loaded.store, ResidualTokens) and not loaded.store.renormalize
    weights = zarr.open_group(str(tmp_path / "v"), mode="r")["residual_weights"][...]
    residual = loaded.store.decode(0, loaded.tokens_count).cpu().numpy() - loaded.centroids[loaded.token_codes]
    matches = np.abs(residual[:, :, None] - weights[None, :, :]).min(axis=2)
    assert matches.max() < 1e-6
    assert weights.shape == (DIM, 2 ** int(codec[-1]))


@pytest.mark.parametrize("codec", ["int8", "residual4", "residual2"])
def test_decoding_at_load_holds_the_same_vectors_as_resident_codes(versions, codec):
    decoded = open_version(versions[codec])
    resident = open_version(versions[codec], keep_codes=True)
    assert isinstance(decoded.store, DenseTokens) and not isinstance(resident.store, DenseTokens)
    n = decoded.tokens_count
    np.testing.assert_array_equal(decoded.tokens.cpu().numpy(), resident.store.decode(0, n).to(torch.float16).cpu().numpy())
    rows = torch.tensor([5, 0, n - 1, 5], device=resident.store.device)  # rows live where the store does
    np.testing.assert_array_equal(resident.store.gather(rows).cpu().numpy(), resident.store.decode(0, n)[rows].cpu().numpy())


def test_resident_codes_take_less_memory_than_decoded_tokens(versions):
    decoded = open_version(versions["residual2"]).store.nbytes
    residual = open_version(versions["residual2"], keep_codes=True).store
    table = 4 * residual.table.nelement()  # per version, not per token: 256 KB at dim 256
    assert residual.nbytes - table == decoded / 8
    assert open_version(versions["int8"], keep_codes=True).store.nbytes < decoded * 0.6


def test_tokens_of_a_version_keeping_codes_are_refused_with_a_hint(versions):
    loaded = open_version(versions["residual4"], keep_codes=True)
    with pytest.raises(FailedPrecondition, match="store.gather"):
        _ = loaded.tokens


def test_renormalised_residual_tokens_are_unit_vectors(versions):
    loaded = open_version(versions["residual4"], keep_codes=True)
    assert loaded.store.renormalize
    norms = torch.linalg.vector_norm(loaded.store.decode(0, loaded.tokens_count), dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert loaded.max_token_norm >= float(norms.max())


@pytest.mark.parametrize("codec", ["residual4", "residual2"])
def test_dims_that_do_not_fill_the_last_byte_round_trip(tmp_path, codec):
    corpus = SyntheticCorpus(13, seed=3)
    docs = corpus.documents(40)
    write_synthetic_version(tmp_path / "v", docs, corpus.encoder, build_params={"codec": codec, "n_centroids": 8})
    loaded = open_version(tmp_path / "v", keep_codes=True)
    original = np.concatenate([d.vectors for d in docs])
    decoded = loaded.store.decode(0, loaded.tokens_count).cpu().numpy()
    assert decoded.shape == original.shape
    assert np.mean(np.sum(decoded * original, axis=1)) > (0.97 if codec == "residual4" else 0.9)


def test_a_format_1_version_still_opens_as_fp16(tmp_path, versions):
    copy = tmp_path / "v1"
    shutil.copytree(versions["fp16"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    codes = group["token_codes"][...].astype(np.int32)
    del group["token_codes"]
    group.create_array("token_codes", shape=codes.shape, dtype="int32", chunks=codes.shape)[...] = codes
    attrs = {k: v for k, v in group.attrs.asdict().items() if k not in ("codec", "normalized", "token_norms", "token_spans")}
    group.attrs.clear()
    group.attrs.update({**attrs, "format_version": 1})
    (copy / MANIFEST_NAME).unlink()
    write_manifest(copy)
    loaded = open_version(copy)
    original = open_version(versions["fp16"])
    assert loaded.codec == "fp16" and loaded.token_codes.dtype == np.int32
    np.testing.assert_array_equal(loaded.tokens.cpu().numpy(), original.tokens.cpu().numpy())
