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
MULTIMODAL_KINDS = ("colpali", "colqwen2")
PADDING_SIDES = ("left", "right")
RESIZE_MODES = ("smart", "fixed")
RESAMPLE_FILTERS = ("bicubic", "bilinear", "lanczos", "nearest")


@dataclass(frozen=True)
class ParityFigures:
    """ONNX vs PyTorch on the export's sample batch, over real (unpadded) tokens only."""

    min_token_cosine: float
    max_abs_diff: float
    texts: int
    tokens: int


@dataclass(frozen=True)
class ImageParity:
    """Image graph (ONNX) vs PyTorch on the export's sample images, over image-patch rows only.
    `sizes`: (width, height) of each sample image. `preprocess_max_abs_diff`: serve-time numpy/PIL
    pixel values vs the Hugging Face processor's on the same images (resize filters differ slightly).
    `end_to_end_min_cosine`: serve-time preprocessing + ONNX vs the processor + PyTorch."""

    min_patch_cosine: float
    max_abs_diff: float
    images: int
    patches: int
    sizes: tuple[tuple[int, int], ...] = ()
    preprocess_max_abs_diff: float = 0.0
    end_to_end_min_cosine: float = 1.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageParity:
        values = dict(raw)
        values["sizes"] = tuple(tuple(int(v) for v in size) for size in values.get("sizes", ()))
        return cls(**values)


@dataclass(frozen=True)
class ImageSpec:
    """How a page image becomes the image graph's inputs (multimodal encoders only).

    `prompt_ids`: the token ids the checkpoint's processor puts around an image, with the image
    placeholder (`image_token_id`) once; serving repeats it once per (merged) patch. `resize`:
    "smart" (Qwen2-VL: keep the aspect ratio, both sides multiples of patch_size * merge_size,
    area within [min_pixels, max_pixels]) or "fixed" (PaliGemma: height x width). Pixels are
    multiplied by `rescale_factor`, then normalised with `mean`/`std` per channel (RGB).
    `temporal_patch_size` > 1 repeats each image in time (Qwen2-VL treats images as 2-frame clips).
    `prompt_type_ids`: per prompt position, the graph's token_type_ids (PaliGemma) or empty.
    """

    prompt: str
    prompt_ids: tuple[int, ...]
    image_token: str
    image_token_id: int
    resize: str
    patch_size: int
    merge_size: int = 1
    temporal_patch_size: int = 1
    min_pixels: int = 0
    max_pixels: int = 0
    height: int = 0
    width: int = 0
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    prompt_type_ids: tuple[int, ...] = ()
    onnx: str = "image.onnx"
    parity: ImageParity | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise InvalidArgument(f"image resize must be one of {RESIZE_MODES}, got {self.resize!r}",
                                  field="image.resize")
        if self.resample not in RESAMPLE_FILTERS:
            raise InvalidArgument(f"image resample must be one of {RESAMPLE_FILTERS}, got {self.resample!r}",
                                  field="image.resample")
        if list(self.prompt_ids).count(self.image_token_id) != 1:
            raise InvalidArgument("image prompt_ids must hold the image token id exactly once",
                                  field="image.prompt_ids")
        if self.prompt_type_ids and len(self.prompt_type_ids) != len(self.prompt_ids):
            raise InvalidArgument("image prompt_type_ids must have one entry per prompt id",
                                  field="image.prompt_type_ids")
        for field in ("patch_size", "merge_size", "temporal_patch_size"):
            if getattr(self, field) < 1:
                raise InvalidArgument(f"image {field} must be at least 1, got {getattr(self, field)}",
                                      field=f"image.{field}")
        if self.resize == "smart" and not 0 < self.min_pixels <= self.max_pixels:
            raise InvalidArgument(f"smart resize needs 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                                  f"{self.max_pixels}", field="image.max_pixels")
        block = self.patch_size * self.merge_size
        if self.resize == "fixed" and (self.height < block or self.width < block or
                                       self.height % block or self.width % block):
            raise InvalidArgument(f"fixed resize needs height and width that are multiples of {block}, got "
                                  f"{self.height}x{self.width}", field="image.height")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InvalidArgument("image mean and std need three values (RGB), std positive", field="image.std")
        _check_file_name("image.onnx", self.onnx)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageSpec:
        values = dict(raw)
        for key in ("prompt_ids", "prompt_type_ids"):
            values[key] = tuple(int(v) for v in values.get(key, ()))
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        if values.get("parity") is not None:
            values["parity"] = ImageParity.from_dict(values["parity"])
        return cls(**values)


@dataclass(frozen=True)
class EncoderSpec:
    """Contents of `encoder.json`.

    Lengths count model positions, special tokens included (as sentence-transformers'
    max_seq_length does). Markers are text prepended before tokenizing; their rows are kept (as
    ColBERT keeps [Q]/[D]) with span (-1, -1). `query_augment` pads queries with `mask_token`
    up to `query_max_length` (ColBERT query augmentation; the masks are not attended to).
    `normalize` says whether the graph already L2-normalises its rows (serving normalises if not).
    `skip_special_tokens` drops template rows ([CLS], [SEP]) so every text row has a span.
    `query_suffix` is text appended to every query and kept (ColPali/ColQwen2 append ten padding
    tokens that are attended to, their form of query augmentation). `padding_side` is where
    batches are padded (ColQwen2 pads left, as its processor does). `image` describes the image
    path of multimodal encoders (kinds colpali, colqwen2); text there runs through `query_onnx`.
    `extra_files`: other files the graphs need (external weights of graphs over 2 GB).
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
    query_suffix: str = ""
    padding_side: str = "right"
    image: ImageSpec | None = None
    extra_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"encoder kind must be one of {KINDS}, got {self.kind!r}", field="kind")
        if self.dim <= 0:
            raise InvalidArgument(f"encoder dim must be positive, got {self.dim}", field="dim")
        # 3 = room for [CLS] + one token + [SEP].
        for field in ("query_max_length", "document_max_length"):
            if getattr(self, field) < 3:
                raise InvalidArgument(f"{field} must be at least 3, got {getattr(self, field)}", field=field)
        for field in ("query_onnx", "document_onnx", "tokenizer_file"):
            _check_file_name(field, getattr(self, field))
        for name in self.extra_files:
            _check_file_name("extra_files", name)
        if self.padding_side not in PADDING_SIDES:
            raise InvalidArgument(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}",
                                  field="padding_side")
        if (self.kind in MULTIMODAL_KINDS) != (self.image is not None):
            raise InvalidArgument(f"{self.kind} encoders {'need' if self.image is None else 'take no'} an image "
                                  "section", field="image")

    @property
    def multimodal(self) -> bool:
        return self.image is not None

    def files(self) -> tuple[str, ...]:
        """Files this spec needs next to `encoder.json`."""
        image = (self.image.onnx,) if self.image is not None else ()
        return tuple(dict.fromkeys((self.tokenizer_file, self.query_onnx, self.document_onnx, *image,
                                    *self.extra_files)))

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
        if values.get("image") is not None:
            values["image"] = ImageSpec.from_dict(values["image"])
        if "extra_files" in values:
            values["extra_files"] = tuple(values["extra_files"])
        return cls(**values)


def _check_file_name(field: str, value: str) -> None:
    # File names come from a file on disk: never let them point outside the directory.
    if not isinstance(value, str) or not value or Path(value).name != value or value in (".", ".."):
        raise InvalidArgument(f"{field} must be a plain file name, got {value!r}", field=field)


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
