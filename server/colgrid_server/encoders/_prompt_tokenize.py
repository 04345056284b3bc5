"""Text for multimodal encoders: prefix + text + suffix, every row kept, padded left or right.

ColPali and ColQwen2 score every token of a query (their processors' template tokens and the
ten augmentation tokens appended as a suffix included), so unlike `_tokenize.TextTokenizer`
nothing is dropped and the suffix is attended to. Uses only `tokenizers` + numpy.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from colgrid_server.encoders._tokenize import NO_SPAN, TokenizedText
from colgrid_server.errors import EncoderError, InvalidArgument


class PromptTokenizer:
    """One purpose (queries or text documents) of a multimodal encoder's tokenizer.

    Texts longer than `max_length` positions lose text tokens from their end; the prefix, suffix
    and template tokens always stay (the model was trained with them)."""

    def __init__(self, tokenizer_json: str, *, max_length: int, prefix: str, suffix: str,
                 skip_special_tokens: bool = False) -> None:
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        padding = self._tokenizer.padding
        self.pad_id = int(padding["pad_id"]) if padding else 0
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()  # truncation happens here, to the text part only
        self.max_length = max_length
        self.prefix = prefix
        self.suffix = suffix
        self.skip_special_tokens = skip_special_tokens
        self._lock = threading.Lock()  # the binding does not document concurrent use of one object

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidArgument(f"text {i} is a {type(text).__name__}, not a string", field=f"texts[{i}]")
            if not text.strip():
                raise InvalidArgument(f"text {i} is empty or whitespace only; send text with words in it",
                                      field=f"texts[{i}]")
        prompts = [self.prefix + t + self.suffix for t in texts]
        with self._lock:
            encodings = self._tokenizer.encode_batch(prompts)
        return [self._rows(i, len(text), prompt, enc) for i, (text, prompt, enc) in enumerate(zip(texts, prompts, encodings))]

    def _rows(self, index: int, text_length: int, prompt: str, enc) -> TokenizedText:  # enc: tokenizers.Encoding
        start_of_text, end_of_text = len(self.prefix), len(self.prefix) + text_length
        ids, tokens, spans, is_text, keep = [], [], [], [], []
        for token_id, token, seq, (start, end) in zip(enc.ids, enc.tokens, enc.sequence_ids, enc.offsets):
            inside = seq is not None and end > start_of_text and start < end_of_text
            ids.append(token_id)
            # Display the characters the token covers (byte-level BPE names like 'Ġm' mean " m").
            tokens.append(prompt[start:end] if end > start else token)
            spans.append((max(start, start_of_text) - start_of_text, min(end, end_of_text) - start_of_text)
                         if inside else NO_SPAN)
            is_text.append(inside)
            keep.append(not (self.skip_special_tokens and seq is None))
        if not any(is_text):
            raise InvalidArgument(f"text {index} yields no tokens (only characters the tokenizer drops)",
                                  field=f"texts[{index}]")
        chosen = np.arange(len(ids))
        if len(ids) > self.max_length:
            fixed = len(ids) - sum(is_text)
            if fixed >= self.max_length:
                raise EncoderError(f"the prompt around a text takes {fixed} tokens, more than max length "
                                   f"{self.max_length}; re-export with a larger length")
            text_rows = np.flatnonzero(is_text)[: self.max_length - fixed]
            chosen = np.sort(np.concatenate([np.flatnonzero(~np.asarray(is_text)), text_rows]))
        kept = chosen[np.asarray(keep)[chosen]]
        return TokenizedText(ids=np.asarray(ids, dtype=np.int64)[chosen],
                             attention=np.ones(len(chosen), dtype=np.int64),
                             keep=np.asarray(keep, dtype=bool)[chosen],
                             tokens=[tokens[i] for i in kept],
                             spans=np.asarray([spans[i] for i in kept], dtype=np.int32).reshape(-1, 2))


def pad_sequences(rows: Sequence[np.ndarray], pad_value: int, side: str,
                  dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(padded (B, L), starts (B,)): rows padded to the longest on `side` ("left" or "right");
    starts[i] is where row i's real values begin."""
    length = max(len(r) for r in rows)
    out = np.full((len(rows), length), pad_value, dtype=dtype)
    starts = np.zeros(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        start = length - len(row) if side == "left" else 0
        out[i, start:start + len(row)] = row
        starts[i] = start
    return out, starts
