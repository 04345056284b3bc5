"""Text -> padded id batches and the rows to keep, with character spans into the original text.

Uses only `tokenizers` + numpy (the serving path never imports torch or transformers).
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from colgrid_server.errors import FailedPrecondition, InvalidArgument

NO_SPAN = (-1, -1)


@dataclass(frozen=True)
class TokenizedText:
    """One text's model input (ids, attention) and which output rows it keeps, with their
    display tokens and spans. `keep`, `ids` and `attention` have one entry per model position."""

    ids: np.ndarray
    attention: np.ndarray
    keep: np.ndarray
    tokens: list[str]
    spans: np.ndarray


class TextTokenizer:
    """One purpose (queries or documents) of an encoder's tokenizer: its own truncation length and
    marker. The `tokenizers` object is configured once here and only read afterwards; calls are
    serialised by a lock since the binding does not document concurrent use of one object (the
    model run, not tokenizing, is where the time goes)."""

    def __init__(self, tokenizer_json: str, *, max_length: int, marker: str, augment: bool,
                 mask_token: str, skip_special_tokens: bool) -> None:
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        padding = self._tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        self._tokenizer.no_padding()  # batches are padded per length bucket by `pad_batch`
        self._tokenizer.enable_truncation(max_length)
        self.max_length = max_length
        self.marker = marker
        self.skip_special_tokens = skip_special_tokens
        self.mask_id: int | None = None
        self.mask_token = mask_token
        if augment:
            self.mask_id = self._tokenizer.token_to_id(mask_token)
            if self.mask_id is None:
                raise FailedPrecondition(f"query augmentation needs {mask_token!r} in the tokenizer's vocabulary")
        self._lock = threading.Lock()

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidArgument(f"text {i} is a {type(text).__name__}, not a string", field=f"texts[{i}]")
            if not text.strip():
                raise InvalidArgument(f"text {i} is empty or whitespace only; send text with words in it",
                                      field=f"texts[{i}]")
        with self._lock:
            encodings = self._tokenizer.encode_batch([self.marker + t for t in texts])
        return [self._rows(i, enc) for i, enc in enumerate(encodings)]

    def _rows(self, index: int, enc) -> TokenizedText:  # enc: tokenizers.Encoding
        shift = len(self.marker)
        keep, tokens, spans = [], [], []
        text_rows = 0
        for token, seq, (start, end) in zip(enc.tokens, enc.sequence_ids, enc.offsets):
            if seq is None:  # added by the post-processor template: [CLS], [SEP]
                keep.append(not self.skip_special_tokens)
                span = NO_SPAN
            elif end <= shift:  # a marker token: kept, but it has no place in the caller's text
                keep.append(True)
                span = NO_SPAN
            else:
                keep.append(True)
                span = (max(start - shift, 0), end - shift)
                text_rows += 1
            if keep[-1]:
                tokens.append(token)
                spans.append(span)
        if text_rows == 0:
            raise InvalidArgument(f"text {index} yields no tokens (only characters the tokenizer drops)",
                                  field=f"texts[{index}]")
        ids = np.asarray(enc.ids, dtype=np.int64)
        attention = np.asarray(enc.attention_mask, dtype=np.int64)
        keep_arr = np.asarray(keep, dtype=bool)
        if self.mask_id is not None and len(ids) < self.max_length:
            # ColBERT query augmentation: [MASK] rows up to the query length, not attended to,
            # each still producing a vector that takes part in MaxSim.
            extra = self.max_length - len(ids)
            ids = np.concatenate([ids, np.full(extra, self.mask_id, dtype=np.int64)])
            attention = np.concatenate([attention, np.zeros(extra, dtype=np.int64)])
            keep_arr = np.concatenate([keep_arr, np.ones(extra, dtype=bool)])
            tokens += [self.mask_token] * extra
            spans += [NO_SPAN] * extra
        return TokenizedText(ids=ids, attention=attention, keep=keep_arr, tokens=tokens,
                             spans=np.asarray(spans, dtype=np.int32).reshape(-1, 2))


def pad_batch(items: Sequence[TokenizedText], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest item: input_ids, attention_mask and (all-zero) token_type_ids."""
    length = max(len(item.ids) for item in items)
    ids = np.full((len(items), length), pad_id, dtype=np.int64)
    attention = np.zeros((len(items), length), dtype=np.int64)
    for row, item in enumerate(items):
        ids[row, : len(item.ids)] = item.ids
        attention[row, : len(item.attention)] = item.attention
    return {"input_ids": ids, "attention_mask": attention, "token_type_ids": np.zeros_like(ids)}
