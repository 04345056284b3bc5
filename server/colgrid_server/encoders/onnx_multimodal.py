"""Serving-side multimodal encoder (ColQwen2, ColPali): ONNX Runtime + tokenizers + numpy + Pillow.

Text (queries, and text documents in a mixed index) runs through the text graph; page images
through the image graph, preprocessed exactly as `encoder.json` records. Safe to share between
threads: sessions run concurrently, tokenizing is serialised per purpose.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from colgrid_server.encoders._image_feeds import FEED_BUILDERS
from colgrid_server.encoders._prompt_tokenize import PromptTokenizer, pad_sequences
from colgrid_server.encoders._session import create_session
from colgrid_server.encoders._tokenize import TokenizedText
from colgrid_server.encoders.image_preprocess import PreparedImage, merged_grid, patch_boxes, patch_cells, prepare_image
from colgrid_server.encoders.spec import MULTIMODAL_KINDS, EncoderSpec, ImageSpec, encoder_id, load_spec
from colgrid_server.encoders.types import EncodedImage, EncodedText
from colgrid_server.errors import EncoderError, FailedPrecondition, InvalidArgument


class MultimodalEncoder:
    """A loaded multimodal encoder directory. `id` is the directory's sha256 identity."""

    def __init__(self, path: Path, spec: EncoderSpec, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        if spec.image is None or spec.kind not in FEED_BUILDERS:
            raise FailedPrecondition(f"encoder {path} is a {spec.kind!r} encoder, not a multimodal one "
                                     f"({', '.join(FEED_BUILDERS)})")
        if spec.query_augment:
            raise FailedPrecondition(f"encoder {path}: multimodal encoders augment queries with query_suffix, "
                                     "not query_augment; re-export it")
        self.path = path
        self.spec = spec
        self.image_spec: ImageSpec = spec.image
        self.id = encoder_id(path)
        missing = [name for name in spec.files() if not (path / name).is_file()]
        if missing:
            raise FailedPrecondition(f"encoder {path} is incomplete: missing {missing}; re-export it")
        tokenizer_json = (path / spec.tokenizer_file).read_text(encoding="utf-8")
        common = {"skip_special_tokens": spec.skip_special_tokens}
        self._query_tokenizer = PromptTokenizer(tokenizer_json, max_length=spec.query_max_length,
                                                prefix=spec.query_marker, suffix=spec.query_suffix, **common)
        self._document_tokenizer = PromptTokenizer(tokenizer_json, max_length=spec.document_max_length,
                                                   prefix=spec.document_marker, suffix="", **common)
        self._text_session = create_session(path / spec.query_onnx, threads=threads, providers=providers)
        self._image_session = create_session(path / self.image_spec.onnx, threads=threads, providers=providers)
        self._image_inputs = [i.name for i in self._image_session.get_inputs()]
        self._text_inputs = [i.name for i in self._text_session.get_inputs()]
        self._build_feeds = FEED_BUILDERS[spec.kind]

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def providers(self) -> list[str]:
        """Execution providers the sessions actually run on, in priority order."""
        return list(self._image_session.get_providers())

    # ---------------------------------------------------------------------------------- text

    def encode_queries(self, texts: Sequence[str], batch_size: int = 32) -> list[EncodedText]:
        return self._encode_texts(texts, self._query_tokenizer, batch_size)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 32) -> list[EncodedText]:
        """Text documents (no query suffix), for indexes that mix text with page images."""
        return self._encode_texts(texts, self._document_tokenizer, batch_size)

    def _encode_texts(self, texts: Sequence[str], tokenizer: PromptTokenizer, batch_size: int) -> list[EncodedText]:
        if isinstance(texts, str):
            raise InvalidArgument("texts must be a sequence of strings, not one string", field="texts")
        _check_batch_size(batch_size)
        items = tokenizer.tokenize(list(texts))
        results: list[EncodedText | None] = [None] * len(items)
        for chosen in _batches(range(len(items)), lambda i: len(items[i].ids), batch_size):
            for i, encoded in zip(chosen, self._run_text([items[i] for i in chosen], tokenizer.pad_id)):
                results[i] = encoded
        return results  # type: ignore[return-value]  # every slot filled above

    def _run_text(self, items: list[TokenizedText], pad_id: int) -> list[EncodedText]:
        input_ids, starts = pad_sequences([item.ids for item in items], pad_id, self.spec.padding_side)
        attention, _ = pad_sequences([item.attention for item in items], 0, self.spec.padding_side)
        feeds = {"input_ids": input_ids, "attention_mask": attention}
        out = self._run(self._text_session, {name: feeds[name] for name in self._text_inputs}, len(items))
        encoded = []
        for row, item in enumerate(items):
            vectors = out[row, starts[row]:starts[row] + len(item.ids)][item.keep]
            encoded.append(EncodedText(vectors=self._normalized(vectors), tokens=item.tokens, spans=item.spans))
        return encoded

    # -------------------------------------------------------------------------------- images

    def prepare_images(self, images: Sequence[Image.Image]) -> list[PreparedImage]:
        """Resize, normalise and cut into patches (no model run): cheap to call off the model thread."""
        if isinstance(images, Image.Image):
            raise InvalidArgument("images must be a sequence of PIL images, not one image", field="images")
        prepared = []
        for i, image in enumerate(images):
            try:
                prepared.append(prepare_image(image, self.image_spec))
            except InvalidArgument as exc:
                raise InvalidArgument(f"image {i}: {exc}", field=f"images[{i}]") from exc
            except OSError as exc:  # Pillow decodes lazily: a truncated file fails here
                raise InvalidArgument(f"image {i} cannot be decoded: {exc}", field=f"images[{i}]") from exc
        return prepared

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 4) -> list[EncodedImage]:
        """One multi-vector per image: a vector per merged patch, with its grid cell and pixel box."""
        return self.encode_prepared(self.prepare_images(images), batch_size)

    def encode_prepared(self, prepared: Sequence[PreparedImage], batch_size: int = 4) -> list[EncodedImage]:
        _check_batch_size(batch_size)
        results: list[EncodedImage | None] = [None] * len(prepared)
        # Similar patch counts in one batch waste little on padding; results go back in input order.
        for chosen in _batches(range(len(prepared)), lambda i: len(prepared[i].pixels), batch_size):
            for i, encoded in zip(chosen, self._run_images([prepared[i] for i in chosen])):
                results[i] = encoded
        return results  # type: ignore[return-value]

    def _run_images(self, images: list[PreparedImage]) -> list[EncodedImage]:
        feeds, image_rows = self._build_feeds(images, self.image_spec, self._query_tokenizer.pad_id,
                                              self.spec.padding_side)
        out = self._run(self._image_session, {name: feeds[name] for name in self._image_inputs}, len(images))
        encoded = []
        for row, (image, token_rows) in enumerate(zip(images, image_rows)):
            rows, cols = merged_grid(image, self.image_spec)
            encoded.append(EncodedImage(vectors=self._normalized(out[row, token_rows]), patches=patch_cells(rows, cols),
                                        grid=(rows, cols), boxes=patch_boxes(rows, cols, *image.size),
                                        size=image.size))
        return encoded

    # ------------------------------------------------------------------------------- helpers

    def _run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], n: int) -> np.ndarray:
        try:
            (out,) = session.run([self.spec.output_name], feeds)
        except Exception as exc:  # ORT raises its own exception types; translate here, once
            raise EncoderError(f"encoder {self.spec.name} failed on a batch of {n}: {exc}") from exc
        return np.asarray(out, dtype=np.float32)

    def _normalized(self, vectors: np.ndarray) -> np.ndarray:
        if not self.spec.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def __repr__(self) -> str:
        return (f"MultimodalEncoder(kind={self.kind!r}, name={self.spec.name!r}, dim={self.dim}, "
                f"id={self.id[:12]}, providers={self.providers})")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}", field="batch_size")


def _batches(indices: range, size_of, batch_size: int):
    order = sorted(indices, key=size_of)
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def load_multimodal_encoder(path: str | Path, *, threads: int | None = None,
                            providers: Sequence[str] | None = None) -> MultimodalEncoder:
    """Load a ColQwen2 / ColPali encoder directory written by export. `threads`: ORT intra-op
    threads (None = ORT's default); `providers`: explicit execution providers (None = CUDA if
    usable, else CPU)."""
    directory = Path(path)
    spec = load_spec(directory)
    if spec.kind not in MULTIMODAL_KINDS:
        raise FailedPrecondition(f"encoder {directory} is a {spec.kind!r} encoder; load_multimodal_encoder reads "
                                 f"{' and '.join(MULTIMODAL_KINDS)} encoders (use load_encoder for text)")
    return MultimodalEncoder(directory, spec, threads=threads, providers=providers)
