"""Serving-side text encoder: ONNX Runtime + tokenizers + numpy, no torch or transformers.

Safe to share between threads: sessions run concurrently, tokenizing is serialised per purpose.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from colgrid_server.encoders._session import create_session
from colgrid_server.encoders._tokenize import TextTokenizer, TokenizedText, pad_batch
from colgrid_server.encoders.spec import EncoderSpec, encoder_id, load_spec
from colgrid_server.encoders.types import EncodedText
from colgrid_server.errors import EncoderError, FailedPrecondition, InvalidArgument


class TextEncoder:
    """A loaded text encoder directory. `id` is the directory's sha256 identity."""

    def __init__(self, path: Path, spec: EncoderSpec, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        self.path = path
        self.spec = spec
        self.id = encoder_id(path)
        missing = [name for name in spec.files() if not (path / name).is_file()]
        if missing:
            raise FailedPrecondition(f"encoder {path} is incomplete: missing {missing}; re-export it")
        tokenizer_json = (path / spec.tokenizer_file).read_text(encoding="utf-8")
        common = {"mask_token": spec.mask_token, "skip_special_tokens": spec.skip_special_tokens}
        self._query_tokenizer = TextTokenizer(tokenizer_json, max_length=spec.query_max_length,
                                              marker=spec.query_marker, augment=spec.query_augment, **common)
        self._document_tokenizer = TextTokenizer(tokenizer_json, max_length=spec.document_max_length,
                                                 marker=spec.document_marker, augment=False, **common)
        self._query_session = create_session(path / spec.query_onnx, threads=threads, providers=providers)
        self._document_session = (self._query_session if spec.document_onnx == spec.query_onnx else
                                  create_session(path / spec.document_onnx, threads=threads, providers=providers))

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def providers(self) -> list[str]:
        """Execution providers the sessions actually run on, in priority order."""
        return list(self._query_session.get_providers())

    def encode_queries(self, texts: Sequence[str], batch_size: int = 32) -> list[EncodedText]:
        return self._encode(texts, self._query_tokenizer, self._query_session, batch_size)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 32) -> list[EncodedText]:
        return self._encode(texts, self._document_tokenizer, self._document_session, batch_size)

    def _encode(self, texts: Sequence[str], tokenizer: TextTokenizer, session: ort.InferenceSession,
                batch_size: int) -> list[EncodedText]:
        if isinstance(texts, str):
            raise InvalidArgument("texts must be a sequence of strings, not one string", field="texts")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
        items = tokenizer.tokenize(list(texts))
        # Similar lengths in one batch waste little on padding; results go back in input order.
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        results: list[EncodedText | None] = [None] * len(items)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            for i, encoded in zip(chosen, self._run(session, [items[i] for i in chosen], tokenizer.pad_id)):
                results[i] = encoded
        return results  # type: ignore[return-value]  # every slot filled above

    def _run(self, session: ort.InferenceSession, items: list[TokenizedText], pad_id: int) -> list[EncodedText]:
        batch = pad_batch(items, pad_id)
        feeds = {i.name: batch[i.name] for i in session.get_inputs()}
        try:
            (out,) = session.run([self.spec.output_name], feeds)
        except Exception as exc:  # ORT raises its own exception types; translate here, once
            raise EncoderError(f"encoder {self.spec.name} failed on a batch of {len(items)}: {exc}") from exc
        out = np.asarray(out, dtype=np.float32)
        encoded = []
        for row, item in enumerate(items):
            vectors = out[row, : len(item.ids)][item.keep]
            if not self.spec.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            encoded.append(EncodedText(vectors=np.ascontiguousarray(vectors), tokens=item.tokens, spans=item.spans))
        return encoded

    def __repr__(self) -> str:
        return f"TextEncoder(name={self.spec.name!r}, dim={self.dim}, id={self.id[:12]}, providers={self.providers})"


def load_encoder(path: str | Path, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> TextEncoder:
    """Load an encoder directory written by export. `threads`: ORT intra-op threads (None = ORT's
    default); `providers`: explicit execution providers (None = CUDA if usable, else CPU)."""
    directory = Path(path)
    spec = load_spec(directory)
    if spec.kind != "colbert":
        raise FailedPrecondition(f"encoder {directory} is a {spec.kind!r} encoder; load_encoder reads text "
                                 "(colbert) encoders")
    return TextEncoder(directory, spec, threads=threads, providers=providers)
