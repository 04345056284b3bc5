"""Reading precomputed multi-vectors from files, memory-mapped (never loaded whole):

- a directory (or its tokens.npy) holding tokens.npy (N_tok, dim) float and doc_offsets.npy
  (N_doc + 1) integers, or
- a .safetensors file (or a directory holding exactly one) with tensors "tokens" (F16, BF16,
  F32 or F64) and "doc_offsets" (I32, I64, U32 or U64),

plus, in the same directory, doc_ids.txt (one id per line) or doc_ids.json (a JSON array of
strings), and optionally metadata.jsonl (one JSON object per line, document order).

The safetensors header is parsed here (8-byte length, JSON, raw little-endian data) so that
serving needs no extra package and the tensors can be memory-mapped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from colgrid_server.errors import InvalidArgument

TOKENS_NPY = "tokens.npy"
OFFSETS_NPY = "doc_offsets.npy"
IDS_TXT = "doc_ids.txt"
IDS_JSON = "doc_ids.json"
METADATA_JSONL = "metadata.jsonl"
MAX_SAFETENSORS_HEADER = 100 << 20

_SAFETENSORS_DTYPES = {
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16,
    "I32": np.int32, "I64": np.int64, "U32": np.uint32, "U64": np.uint64,
}  # fmt: skip


@dataclass(frozen=True)
class VectorFiles:
    """What load_vector_files found: pass the fields to build_version_from_arrays."""

    tokens: Any  # (N_tok, dim) memory-mapped floats (np.memmap, or BFloat16Rows)
    doc_offsets: np.ndarray  # int64 (N_doc + 1,)
    doc_ids: list[str]
    metadata: list[dict[str, Any]] | None = None
    sources: tuple[Path, ...] = field(default=())  # the files read


class BFloat16Rows:
    """Row slices of a memory-mapped bfloat16 matrix as float32 (numpy has no bfloat16: the
    upper 16 bits of a float32 are a bfloat16, so the conversion is exact)."""

    def __init__(self, raw: np.ndarray) -> None:
        self._raw = raw  # uint16 (N_tok, dim)
        self.shape: tuple[int, ...] = raw.shape
        self.dtype = np.dtype(np.float32)
        self.ndim = raw.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return (np.asarray(self._raw[key]).astype(np.uint32) << 16).view(np.float32)


def load_vector_files(path: Path | str) -> VectorFiles:
    """Locate and open the vector files at path (a directory, a tokens .npy or a .safetensors
    file); InvalidArgument naming the file and field when something is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise InvalidArgument(f"{path} does not exist", field="path")
    directory = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix == ".safetensors":
        tokens, offsets, sources = _read_safetensors(path)
    elif path.is_file() and path.suffix == ".npy":
        tokens, offsets, sources = _read_npy(path, directory / OFFSETS_NPY)
    elif path.is_dir() and (directory / TOKENS_NPY).is_file():
        tokens, offsets, sources = _read_npy(directory / TOKENS_NPY, directory / OFFSETS_NPY)
    elif path.is_dir() and len(found := sorted(directory.glob("*.safetensors"))) == 1:
        tokens, offsets, sources = _read_safetensors(found[0])
    else:
        raise InvalidArgument(
            f"{path}: expected {TOKENS_NPY} + {OFFSETS_NPY}, or one .safetensors file with tensors "
            f"'tokens' and 'doc_offsets'", field="path",
        )  # fmt: skip
    ids, ids_path = _read_ids(directory)
    metadata_path = directory / METADATA_JSONL
    metadata = _read_metadata(metadata_path) if metadata_path.is_file() else None
    extra = (ids_path,) + ((metadata_path,) if metadata is not None else ())
    return VectorFiles(tokens=tokens, doc_offsets=offsets, doc_ids=ids, metadata=metadata, sources=sources + extra)


def _read_npy(tokens_path: Path, offsets_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[Path, ...]]:
    tokens = _load_npy(tokens_path, "tokens")
    if not offsets_path.is_file():
        raise InvalidArgument(f"{offsets_path} is missing: {TOKENS_NPY} needs its {OFFSETS_NPY}", field="doc_offsets")
    offsets = _load_npy(offsets_path, "doc_offsets")
    return tokens, _offsets(offsets, offsets_path), (tokens_path, offsets_path)


def _load_npy(path: Path, field: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidArgument(f"{path} is not a readable .npy array ({exc})", field=field) from exc


def _offsets(values: np.ndarray, path: Path) -> np.ndarray:
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise InvalidArgument(f"{path}: doc_offsets must be a 1-D integer array, got {values.dtype} {values.shape}", field="doc_offsets")
    if np.issubdtype(values.dtype, np.unsignedinteger) and values.size and values.max() > np.iinfo(np.int64).max:
        raise InvalidArgument(f"{path}: doc_offsets beyond the int64 range", field="doc_offsets")
    return np.asarray(values, dtype=np.int64)


def _read_safetensors(path: Path) -> tuple[Any, np.ndarray, tuple[Path, ...]]:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise InvalidArgument(f"{path} is not a safetensors file (bad header length)", field="path")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{path} is not a safetensors file (header is not JSON)", field="path") from exc
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path} is not a safetensors file (header is not an object)", field="path")
    tokens = _tensor(path, header, "tokens", 8 + n, size)
    offsets = _tensor(path, header, "doc_offsets", 8 + n, size)
    if header["tokens"]["dtype"] == "BF16":
        tokens = BFloat16Rows(tokens)
    elif not np.issubdtype(tokens.dtype, np.floating):
        raise InvalidArgument(f"{path}: tensor 'tokens' must be F16, BF16, F32 or F64, got {header['tokens']['dtype']}", field="tokens")
    return tokens, _offsets(offsets, path), (path,)


def _tensor(path: Path, header: dict[str, Any], name: str, data_start: int, size: int) -> np.ndarray:
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{path} has no tensor {name!r} (it holds {sorted(k for k in header if k != '__metadata__')})", field=name)
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
    shape, span = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise InvalidArgument(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}", field=name)
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise InvalidArgument(f"{path}: tensor {name!r} has an invalid shape {shape!r}", field=name)
    if not (isinstance(span, list) and len(span) == 2 and all(isinstance(o, int) for o in span)):
        raise InvalidArgument(f"{path}: tensor {name!r} has invalid data_offsets {span!r}", field=name)
    begin, end = span
    if not 0 <= begin <= end or data_start + end > size or end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
        raise InvalidArgument(f"{path}: tensor {name!r} data_offsets {span} do not match its shape {shape} or the file", field=name)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=data_start + begin, shape=tuple(shape))


def _read_ids(directory: Path) -> tuple[list[str], Path]:
    txt, js = directory / IDS_TXT, directory / IDS_JSON
    if js.is_file():
        try:
            ids = json.loads(js.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{js} is not valid UTF-8 JSON ({exc})", field="doc_ids") from exc
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidArgument(f"{js} must hold a JSON array of strings", field="doc_ids")
        return ids, js
    if txt.is_file():
        try:
            lines = txt.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{txt} is not valid UTF-8", field="doc_ids") from exc
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        ids = [line.removesuffix("\r") for line in lines]
        if "" in ids:
            raise InvalidArgument(f"{txt}: line {ids.index('') + 1} is empty; every line is one document id", field="doc_ids")
        return ids, txt
    raise InvalidArgument(f"{directory} has neither {IDS_TXT} nor {IDS_JSON} (the document ids)", field="doc_ids")


def _read_metadata(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path} is not valid UTF-8", field="metadata") from exc
    out = []
    for lineno, line in enumerate(lines, start=1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path}:{lineno}: not valid JSON ({exc.msg})", field="metadata") from exc
        if not isinstance(value, dict):
            raise InvalidArgument(f"{path}:{lineno}: each line must be a JSON object", field="metadata")
        out.append(value)
    return out
