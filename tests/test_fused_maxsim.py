"""The fused Triton MaxSim kernel (`FusedMaxima`, the CUDA default): on CPU it runs in Triton's
interpreter, the same kernel source a GPU compiles (on a CUDA machine these tests run there). Per-document maxima equal the
float64 reference for any candidate order, token count across tile edges, feature dim (tiled or
masked) and query width (one or several query blocks, as batched searches give)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from colgrid_server.search import Searcher
from colgrid_server.search._fused import FusedMaxima, LaunchConfig, available, fused_self_check
from tests.searcher_checks import assert_answers_as, synthetic_version

# Lengths around the 64-row tile (and a long one spanning many tiles).
LENGTHS = [1, 2, 63, 64, 65, 128, 200, 1, 300, 17]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _corpus(dim: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    docs = [rng.standard_normal((n, dim)).astype(np.float16) for n in LENGTHS]
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    return torch.from_numpy(np.concatenate(docs)).to(DEVICE), offsets, [d.astype(np.float64) for d in docs]


def _reference(query: np.ndarray, docs: list[np.ndarray], which: np.ndarray) -> np.ndarray:
    return np.stack([(query.astype(np.float64) @ docs[d].T).max(axis=1) for d in which])


def test_the_kernel_runs_here():
    assert available(DEVICE)  # compiled on a GPU, interpreted on CPU


@pytest.mark.parametrize("dim", [128, 384, 100], ids=["dim128", "dim384-three-tiles", "dim100-masked"])
@pytest.mark.parametrize("n_q", [1, 32, 40, 100], ids=["q1", "q32", "q40-two-blocks", "q100-batched"])
def test_maxima_equal_the_float64_reference(dim, n_q):
    tokens, offsets, docs = _corpus(dim)
    rng = np.random.default_rng(dim + n_q)
    query = rng.standard_normal((n_q, dim)).astype(np.float32)
    which = rng.permutation(len(LENGTHS))[:7]
    got = FusedMaxima(tokens, offsets).maxima(torch.from_numpy(query), which).cpu().numpy()
    want = _reference(query, docs, which)
    assert got.shape == (7, n_q)
    # float32 accuracy, not float16's: the query is split into two float16 parts.
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_every_document_in_order_and_repeated_candidates():
    tokens, offsets, docs = _corpus(64)
    query = np.random.default_rng(1).standard_normal((20, 64)).astype(np.float32)
    layout = FusedMaxima(tokens, offsets)
    for which in (np.arange(len(LENGTHS)), np.array([4, 4, 0, 4])):
        got = layout.maxima(torch.from_numpy(query), which).cpu().numpy()
        np.testing.assert_allclose(got, _reference(query, docs, which), rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("config", [LaunchConfig(block_tokens=16), LaunchConfig(block_tokens=128, warps=8, stages=2)])
def test_every_launch_configuration_gives_the_same_maxima(config):
    tokens, offsets, docs = _corpus(32)
    query = np.random.default_rng(2).standard_normal((9, 32)).astype(np.float32)
    which = np.arange(len(LENGTHS))
    got = FusedMaxima(tokens, offsets, config).maxima(torch.from_numpy(query), which).cpu().numpy()
    np.testing.assert_allclose(got, _reference(query, docs, which), rtol=2e-6, atol=1e-4)


def test_no_candidates_give_no_maxima_and_bad_input_is_refused():
    tokens, offsets, _ = _corpus(16)
    layout = FusedMaxima(tokens, offsets)
    assert layout.maxima(torch.ones((3, 16)), np.array([], dtype=np.int64)).shape == (0, 3)
    with pytest.raises(ValueError, match="dim"):
        layout.maxima(torch.ones((2, 17)), np.array([0]))
    with pytest.raises(ValueError, match="float16"):
        FusedMaxima(tokens.to(torch.float32), offsets)
    with pytest.raises(ValueError, match="rows"):
        FusedMaxima(tokens, offsets[:-1])


def test_the_self_check_passes_on_a_sound_kernel():
    tokens, offsets, _ = _corpus(48)
    assert fused_self_check(FusedMaxima(tokens, offsets))


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    return synthetic_version(tmp_path_factory, "fused")


def test_a_searcher_on_the_fused_kernel_answers_as_the_segment_kernel(version):
    loaded, corpus = version
    fused, plain = Searcher(loaded, fused=True), Searcher(loaded, fused=False, padded=False, fast_pass=False)
    assert fused.fused is not None and fused.padded is None and plain.fused is None
    # The default on a GPU; on CPU the screened passes serve, not the interpreter.
    assert (Searcher(loaded).fused is not None) == (loaded.device.type == "cuda")
    assert_answers_as(fused, plain, corpus)


def test_a_configuration_too_big_for_the_gpu_shrinks_its_pipeline_then_its_tiles():
    from colgrid_server.search._fused import _smaller

    assert _smaller(LaunchConfig(64, 4, 3)) == LaunchConfig(64, 4, 2)
    assert _smaller(LaunchConfig(64, 4, 1)) == LaunchConfig(32, 4, 1)
    with pytest.raises(RuntimeError, match="fits no launch configuration"):
        _smaller(LaunchConfig(16, 4, 1))
