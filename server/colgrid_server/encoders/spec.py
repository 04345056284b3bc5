"""An encoder directory's description (`encoder.json`) and its identity (sha256 of its files).

The spec is everything the serving side needs to turn text into the same multi-vectors the export
verified: which graphs to run, how to tokenize (lengths, markers, augmentation), which rows to
keep. Export writes it; serving only reads it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colgrid_server.errors import FailedPrecondition, InvalidArgument, NotFound

SPEC_FILE = "encoder.json"
FORMAT_VERSION = 1
KINDS = ("colbert", "colpali", "colqwen2")


@dataclass(frozen=True)
class ParityFigures:
    """ONNX vs PyTorch on the export's sample batch, over real (unpadded) tokens only."""

    min_token_cosine: float
    max_abs_diff: float
    texts: int
    tokens: int


@dataclass(frozen=True)
class EncoderSpec:
    """Contents of `encoder.json`.

    Lengths count model positions, special tokens included (as sentence-transformers'
    max_seq_length does). Markers are text prepended before tokenizing; their rows are kept (as
    ColBERT keeps [Q]/[D]) with span (-1, -1). `query_augment` pads queries with `mask_token`
    up to `query_max_length` (ColBERT query augmentation; the masks are not attended to).
    `normalize` says whether the graph already L2-normalises its rows (serving normalises if not).
    `skip_special_tokens` drops template rows ([CLS], [SEP]) so every text row has a span.
    """

    kind: str
    name: str
    dim: int
    query_max_length: int = 32
    document_max_length: int = 256
    query_marker: str = ""
    document_marker: str = ""
    query_augment: bool = False
    mask_token: str = "[MASK]"
    normalize: bool = True
    skip_special_tokens: bool = True
    query_onnx: str = "model.onnx"
    document_onnx: str = "model.onnx"
    tokenizer_file: str = "tokenizer.json"
    output_name: str = "token_vectors"
    format_version: int = FORMAT_VERSION
    source: str = ""
    source_sha256: str = ""
    exported_with: str = ""
    parity: ParityFigures | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"encoder kind must be one of {KINDS}, got {self.kind!r}", field="kind")
        if self.dim <= 0:
            raise InvalidArgument(f"encoder dim must be positive, got {self.dim}", field="dim")
        # 3 = room for [CLS] + one token + [SEP].
        for field in ("query_max_length", "document_max_length"):
            if getattr(self, field) < 3:
                raise InvalidArgument(f"{field} must be at least 3, got {getattr(self, field)}", field=field)
        # File names come from a file on disk: never let them point outside the directory.
        for field in ("query_onnx", "document_onnx", "tokenizer_file"):
            value = getattr(self, field)
            if not value or Path(value).name != value or value in (".", ".."):
                raise InvalidArgument(f"{field} must be a plain file name, got {value!r}", field=field)

    def files(self) -> tuple[str, ...]:
        """Files this spec needs next to `encoder.json`."""
        return tuple(dict.fromkeys((self.tokenizer_file, self.query_onnx, self.document_onnx)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EncoderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        values = dict(raw)
        if values.get("parity") is not None:
            values["parity"] = ParityFigures(**values["parity"])
        return cls(**values)


def load_spec(directory: str | Path) -> EncoderSpec:
    """Read `<directory>/encoder.json`. NotFound if absent; FailedPrecondition if unreadable."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise NotFound(f"no encoder at {directory}: {SPEC_FILE} is missing", resource_type="encoder",
                       resource_name=str(directory))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("top level is not an object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}; this server reads {FORMAT_VERSION}")
        return EncoderSpec.from_dict(raw)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and InvalidArgument are ValueErrors
        raise FailedPrecondition(f"{path} is not a valid encoder spec ({exc}); re-export the encoder") from exc


def write_spec(directory: str | Path, spec: EncoderSpec) -> Path:
    """Write `encoder.json` atomically (temporary file, then replace)."""
    path = Path(directory) / SPEC_FILE
    tmp = path.with_name(f".{SPEC_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(spec.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def encoder_id(directory: str | Path) -> str:
    """sha256 (hex) over every file in the directory: sorted relative names, sizes and contents.

    Any change to a graph, the tokenizer or the spec changes the identity; index versions record
    it so a query is never encoded by a different encoder than the one that built the index.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotFound(f"no encoder directory at {root}", resource_type="encoder", resource_name=str(root))
    digest = hashlib.sha256()
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    for file in files:
        name = file.relative_to(root).as_posix().encode("utf-8")
        # Name and size delimit each file so no two layouts hash the same stream.
        digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
