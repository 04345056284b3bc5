"""Loading a version's token payload into a TokenStore, chunk by chunk (never two full copies).

keep_codes=False decodes a compressed version at load into float16, the layout the MaxSim
kernel reads fastest (the same memory as an fp16 version). keep_codes=True keeps the codes
resident and decodes the candidates' rows per query (DESIGN.md "Index versions")."""
from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import numpy as np
import torch
import zarr

from colgrid_server.index import _format as F
from colgrid_server.index._codecs import INT8_MAX, ResidualBuckets, int8_decode, packed_width, residual_decode, residual_table
from colgrid_server.index._entropy import EntropyModel, decode_block
from colgrid_server.index._stores import DenseTokens, Int8Tokens, ResidualTokens, TokenStore

DECODE_THREADS = 8  # entropy blocks decoded at once while loading (at most the machine's cores)
Read = Callable[..., np.ndarray]  # (array name, selection=...) -> values; CorruptVersion on failure
Fail = Callable[[str], NoReturn]


class TokenLoader:
    def __init__(self, arrays: Mapping[str, zarr.Array], read: Read, fail: Fail, *, n_tok: int, dim: int, device: torch.device) -> None:
        self.arrays, self.read, self.fail = arrays, read, fail
        self.n_tok, self.dim, self.device = n_tok, dim, device

    def shapes(self, codec: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], type]]:
        """The shape and dtype each of the codec's arrays must have."""
        n, dim, name = self.n_tok, self.dim, codec["name"]
        if name == "fp16":
            return {F.TOKENS: ((n, dim), np.float16)}
        if name == "int8":
            return {F.TOKENS_INT8: ((n, dim), np.int8), F.TOKEN_SCALES: ((n,), np.float32)}
        if name.startswith("entropy"):
            blocks = -(-n // int(codec["block_rows"]))
            return {
                F.ENTROPY_BYTES: ((self.arrays[F.ENTROPY_BYTES].shape[0],), np.uint8),  # checked against the offsets
                F.ENTROPY_BLOCK_OFFSETS: ((blocks + 1,), np.int64),
                F.ENTROPY_UNARY_LENGTHS: ((blocks, dim), np.uint32),
                F.ENTROPY_ROTATION: ((dim, dim), np.float32),
                F.ENTROPY_SCALES: ((dim,), np.float32),
                F.ENTROPY_RICE_K: ((dim,), np.uint8),
            }
        buckets = 1 << int(codec["nbits"])
        return {
            F.RESIDUALS: ((n, packed_width(dim, int(codec["nbits"]))), np.uint8),
            F.RESIDUAL_CUTOFFS: ((dim, buckets - 1), np.float32),
            F.RESIDUAL_WEIGHTS: ((dim, buckets), np.float32),
        }

    def load(
        self, codec: Mapping[str, Any], codes: np.ndarray, centroids: np.ndarray, *, keep_codes: bool, max_input_norm: float | None
    ) -> TokenStore:
        """max_input_norm: the largest norm of the vectors the codec encoded (zarr.json), if known."""
        name = codec["name"]
        if name == "fp16":
            tokens, max_norm = self._dense(F.TOKENS, lambda block, start: block)
            return DenseTokens(tokens, codec="fp16", max_norm=max_norm)
        if name == "int8":
            return self._int8(keep_codes, max_input_norm)
        if name.startswith("entropy"):  # blocks decode only whole: always decoded at load
            return self._entropy(codec, codes, centroids)
        return self._residual(codec, codes, centroids, keep_codes)

    def _int8(self, keep_codes: bool, max_input_norm: float | None) -> TokenStore:
        scales = self.read(F.TOKEN_SCALES)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            self.fail("token_scales holds a scale that is not a positive finite number")
        scales_t = torch.from_numpy(scales)

        def decode(block: np.ndarray, start: int) -> np.ndarray:
            return int8_decode(torch.from_numpy(block), scales_t[start : start + block.shape[0]]).numpy()

        if not keep_codes:
            tokens, max_norm = self._dense(F.TOKENS_INT8, decode)
            return DenseTokens(tokens, codec="int8", max_norm=max_norm)
        q = torch.empty((self.n_tok, self.dim), dtype=torch.int8)
        measured = 0.0
        for start, block in self._chunks(F.TOKENS_INT8):
            q[start : start + block.shape[0]] = torch.from_numpy(block)
            if max_input_norm is None:
                measured = max(measured, _block_max_norm(decode(block, start)))
        if max_input_norm is not None:
            # Rounding moves each coordinate by at most half a step, scale / 2 <= |x|max / 254:
            # |decoded| <= |x| (1 + sqrt(dim) / 254). A bound is all the bf16 pass needs, and
            # it saves decoding every token at load.
            measured = max_input_norm * (1 + math.sqrt(self.dim) / (2 * INT8_MAX)) * (1 + 1e-6)
        return Int8Tokens(q.to(self.device), scales_t.to(self.device), max_norm=measured)

    def _residual(self, codec: Mapping[str, Any], codes: np.ndarray, centroids: np.ndarray, keep_codes: bool) -> TokenStore:
        cutoffs, weights = self.read(F.RESIDUAL_CUTOFFS), self.read(F.RESIDUAL_WEIGHTS)
        if not (np.isfinite(cutoffs).all() and np.isfinite(weights).all()):
            self.fail("residual_cutoffs or residual_weights hold NaN or infinity")
        buckets = ResidualBuckets(nbits=int(codec["nbits"]), cutoffs=cutoffs, weights=weights)
        table = residual_table(buckets, self.dim)
        renormalize = bool(codec.get("renormalize", False))
        centroids_t = torch.from_numpy(centroids)
        codes_t = torch.from_numpy(codes)

        def decode(block: np.ndarray, start: int) -> np.ndarray:
            block_codes = codes_t[start : start + block.shape[0]]
            return residual_decode(torch.from_numpy(block), block_codes, centroids_t, table, self.dim, renormalize).numpy()

        if not keep_codes:
            tokens, max_norm = self._dense(F.RESIDUALS, decode)
            return DenseTokens(tokens, codec=codec["name"], max_norm=max_norm)
        packed = torch.empty((self.n_tok, table.shape[0] // 256), dtype=torch.uint8)
        for start, block in self._chunks(F.RESIDUALS):
            packed[start : start + block.shape[0]] = torch.from_numpy(block)
        d = self.device
        # uint16 codes serve as they are on CPU; CUDA kernels cover few uint16 ops, so int32 there.
        codes_d = codes_t if d.type == "cpu" else codes_t.to(torch.int32).to(d)
        return ResidualTokens(
            packed.to(d), codes_d, centroids_t.to(d), table.to(d), codec=codec["name"], dim=self.dim, renormalize=renormalize
        )

    def _entropy(self, codec: Mapping[str, Any], codes: np.ndarray, centroids: np.ndarray) -> TokenStore:
        offsets, unary = self.read(F.ENTROPY_BLOCK_OFFSETS), self.read(F.ENTROPY_UNARY_LENGTHS)
        n_bytes = self.arrays[F.ENTROPY_BYTES].shape[0]
        if offsets[0] != 0 or offsets[-1] != n_bytes or np.any(np.diff(offsets) <= 0):
            self.fail("entropy_block_offsets is not a CSR index over entropy_bytes")
        rotation, scales, rice_k = self.read(F.ENTROPY_ROTATION), self.read(F.ENTROPY_SCALES), self.read(F.ENTROPY_RICE_K)
        if not (np.isfinite(rotation).all() and np.isfinite(scales).all() and (scales > 0).all()):
            self.fail("entropy_rotation or entropy_scales hold NaN, infinity or a scale that is not positive")
        if int(rice_k.max(initial=0)) > 62:
            self.fail("entropy_rice_k holds a Rice parameter over 62")
        model = EntropyModel(rotation=rotation, scale=scales, step=float(codec["step"]), rice_k=rice_k,
                             escape_quotient=int(codec["escape_quotient"]))  # fmt: skip
        block_rows, renormalize = int(codec["block_rows"]), bool(codec.get("renormalize", False))

        def block(index: int) -> tuple[int, np.ndarray]:
            start = index * block_rows
            rows = min(block_rows, self.n_tok - start)
            data = self.read(F.ENTROPY_BYTES, slice(int(offsets[index]), int(offsets[index + 1])))
            try:
                values = decode_block(data, unary[index], rows, model)
            except ValueError as exc:
                self.fail(f"entropy block {index} (tokens {start}..{start + rows}) does not decode: {exc}")
            values += centroids[codes[start : start + rows]]
            if renormalize:
                values /= np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)
            return start, values

        n_blocks = offsets.shape[0] - 1
        tokens, max_norm = self._dense_from(_in_order(block, n_blocks), F.ENTROPY_BYTES)
        return DenseTokens(tokens, codec=codec["name"], max_norm=max_norm)

    def _dense(self, name: str, decode: Callable[[np.ndarray, int], np.ndarray]) -> tuple[torch.Tensor, float]:
        """float16 (N_tok, dim) on the device from array name, decoded chunk by chunk, and the
        largest stored token norm (it bounds the error of reduced-precision scoring)."""
        return self._dense_from(((start, decode(block, start)) for start, block in self._chunks(name)), name)

    def _dense_from(self, decoded: Iterator[tuple[int, np.ndarray]], name: str) -> tuple[torch.Tensor, float]:
        """float16 (N_tok, dim) on the device from (first row, decoded rows) blocks. numpy does
        the per-block copy: single-threaded, it is not slowed by torch's pool on busy hosts."""
        tokens = torch.empty((self.n_tok, self.dim), dtype=torch.float16, device=self.device)
        host = tokens.numpy() if self.device.type == "cpu" else None
        max_norm = 0.0
        for start, decoded_block in decoded:
            values = np.asarray(decoded_block).astype(np.float16, copy=False)
            stop = start + values.shape[0]
            block_max = _block_max_norm(values)  # NaN or infinity if any value is
            if not math.isfinite(block_max):
                self.fail(f"{name} rows {start}..{stop} contain or decode to NaN or infinity")
            max_norm = max(max_norm, block_max)
            if host is not None:
                host[start:stop] = values
            else:
                tokens[start:stop] = torch.from_numpy(values).to(self.device)
        return tokens, max_norm

    def _chunks(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        array = self.arrays[name]
        step = array.chunks[0]
        for start in range(0, self.n_tok, step):
            yield start, self.read(name, slice(start, start + step))


def _in_order(work: Callable[[int], tuple[int, np.ndarray]], count: int) -> Iterator[tuple[int, np.ndarray]]:
    """work(0), ..., work(count - 1) in order, run on a few threads (numpy releases the GIL in
    the decoding), with at most two results per thread waiting: bounded memory."""
    workers = max(1, min(DECODE_THREADS, os.cpu_count() or 1, count))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="colgrid-decode") as pool:
        pending: deque[Future[tuple[int, np.ndarray]]] = deque()
        for index in range(count):
            pending.append(pool.submit(work, index))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _block_max_norm(block: np.ndarray) -> float:
    wide = block.astype(np.float32)
    return math.sqrt(float(np.einsum("ij,ij->i", wide, wide).max())) if wide.size else 0.0
