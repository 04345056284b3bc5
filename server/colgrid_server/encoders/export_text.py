"""Export a local ColBERT-style text checkpoint (Hugging Face layout) to an encoder directory.

torch and transformers are imported only when an export runs, so importing this module (and the
`colgrid_server.encoders` package) stays cheap for serving.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import AddedToken, Tokenizer
from tqdm import tqdm

from colgrid_server.encoders._session import CPU, session_options
from colgrid_server.encoders._tokenize import TextTokenizer, pad_batch
from colgrid_server.encoders.spec import EncoderSpec, ParityFigures, encoder_id, write_spec
from colgrid_server.errors import ColgridError, EncoderError, FailedPrecondition, InvalidArgument

ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
OUTPUT_NAME = "token_vectors"

# Parity batch: lengths from a few tokens to past any document length, padded together, with
# punctuation, digits and non-ASCII text. Its shapes differ from the trace sample's on purpose.
PARITY_TEXTS = (
    "What is late interaction?",
    "ColBERT encodes queries and documents into one vector per token and scores them with MaxSim.",
    "Zürich's café served crème brûlée; naïve façades — 42 % of 1,337 visitors agreed.",
    " ".join(["An inverted file over centroids narrows the candidates before exact scoring."] * 40),
    "short",
)
_TRACE_TEXTS = ("trace sample", "a second trace sample sentence")


@dataclass(frozen=True)
class ExportReport:
    encoder_id: str
    path: Path
    min_token_cosine: float
    max_abs_diff: float
    seconds: float


def export_text_encoder(checkpoint: str | Path, out_dir: Path, *, name: str | None = None,
                        query_max_length: int = 32, document_max_length: int = 256,
                        query_marker: str = "", document_marker: str = "", query_augment: bool = False,
                        source: str | None = None, min_token_cosine: float = 0.999,
                        progress: bool = True) -> ExportReport:
    """Export `checkpoint` (a local directory) to `out_dir`, which must not exist or be empty.

    The graph maps input_ids / attention_mask (/ token_type_ids) to L2-normalised per-token
    vectors (through the checkpoint's ColBERT `linear` projection when it has one). Parity with
    PyTorch is checked on a padded batch; below `min_token_cosine` on any real token the export
    fails with EncoderError. Everything is written to a temporary sibling directory that is
    renamed into place at the end, so a failed export leaves nothing behind.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    if not (checkpoint / "config.json").is_file():
        raise InvalidArgument(f"{checkpoint} is not a local Hugging Face checkpoint (no config.json)",
                              field="checkpoint")
    _require_free(out_dir)
    # Argument errors first, before minutes of loading: a spec with a placeholder dim validates them.
    EncoderSpec(kind="colbert", name=name or checkpoint.name, dim=1, query_max_length=query_max_length,
                document_max_length=document_max_length)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    steps = tqdm(total=5, desc=f"export {name or checkpoint.name}", unit="step", disable=not progress)
    try:
        steps.set_postfix_str("loading checkpoint")
        from colgrid_server.encoders import _torch_text  # torch + transformers: export only

        loaded = _torch_text.load_checkpoint(checkpoint)
        steps.update()

        steps.set_postfix_str("writing tokenizer")
        tokenizer_json = _tokenizer_json(loaded.tokenizer, document_max_length, (query_marker, document_marker))
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        documents = TextTokenizer(tokenizer_json, max_length=document_max_length, marker=document_marker,
                                  augment=False, mask_token="[MASK]", skip_special_tokens=True)
        input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.takes_token_type_ids else [])
        steps.update()

        steps.set_postfix_str("exporting ONNX")
        trace = _torch_inputs(pad_batch(documents.tokenize(_TRACE_TEXTS), documents.pad_id), input_names)
        _torch_text.export_onnx(loaded.module, trace, tmp / ONNX_FILE, OUTPUT_NAME)
        steps.update()

        steps.set_postfix_str("checking parity")
        parity = _parity(loaded.module, tmp / ONNX_FILE, documents, input_names)
        if not parity.min_token_cosine >= min_token_cosine:  # also catches NaN
            raise EncoderError(
                f"ONNX/PyTorch parity failed for {checkpoint}: min per-token cosine {parity.min_token_cosine:.7f} "
                f"< {min_token_cosine} (max abs diff {parity.max_abs_diff:.2e}); the graph does not "
                "reproduce the model, so nothing was written")
        steps.update()

        steps.set_postfix_str("writing spec")
        spec = EncoderSpec(
            kind="colbert", name=name or checkpoint.name, dim=loaded.dim, query_max_length=query_max_length,
            document_max_length=document_max_length, query_marker=query_marker, document_marker=document_marker,
            query_augment=query_augment, query_onnx=ONNX_FILE, document_onnx=ONNX_FILE,
            tokenizer_file=TOKENIZER_FILE, output_name=OUTPUT_NAME,
            source=source or loaded.name_or_path or checkpoint.name,
            source_sha256=_sha256_files(_torch_text.weight_files(checkpoint)),
            exported_with=_torch_text.versions(), parity=parity)
        write_spec(tmp, spec)
        if query_augment:  # fail now, not at first load, if the vocabulary has no mask token
            TextTokenizer(tokenizer_json, max_length=query_max_length, marker=query_marker, augment=True,
                          mask_token=spec.mask_token, skip_special_tokens=True)
        _fsync_tree(tmp)
        _publish(tmp, out_dir)
        steps.update()
    except ColgridError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # torch/transformers/onnx failures: one translation, with the cause chained
        shutil.rmtree(tmp, ignore_errors=True)
        raise EncoderError(f"export of {checkpoint} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        steps.close()
    return ExportReport(encoder_id=encoder_id(out_dir), path=out_dir, min_token_cosine=parity.min_token_cosine,
                        max_abs_diff=parity.max_abs_diff, seconds=time.perf_counter() - started)


def _require_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FailedPrecondition(f"{out_dir} already exists and is not empty; remove it or export elsewhere")


def _tokenizer_json(hf_tokenizer, max_length: int, markers: Iterable[str]) -> str:
    """The checkpoint's fast tokenizer with truncation and longest-padding set explicitly (shipped
    files may carry other values, e.g. all-MiniLM-L6-v2's fixed 128)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EncoderError("the checkpoint has no fast tokenizer (tokenizer.json); save one with "
                           "AutoTokenizer.from_pretrained(...).save_pretrained(...) and export again")
    if hf_tokenizer.pad_token_id is None:
        raise EncoderError("the checkpoint's tokenizer has no padding token; set pad_token and export again")
    tokenizer = Tokenizer.from_str(backend.to_str())
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=hf_tokenizer.pad_token_id, pad_token=hf_tokenizer.pad_token)
    # A marker word that is one vocabulary entry (ColBERT's "[unused0]") must stay one token.
    for piece in dict.fromkeys(p for marker in markers for p in marker.split()):  # stable order
        if tokenizer.token_to_id(piece) is not None and \
                tokenizer.encode(piece, add_special_tokens=False).tokens != [piece]:
            tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False)])
    return tokenizer.to_str()


def _torch_inputs(batch: dict[str, np.ndarray], names: list[str]) -> dict:
    import torch

    return {name: torch.from_numpy(batch[name]) for name in names}


def _parity(module, onnx_path: Path, tokenizer: TextTokenizer, input_names: list[str]) -> ParityFigures:
    from colgrid_server.encoders import _torch_text

    batch = pad_batch(tokenizer.tokenize(PARITY_TEXTS), tokenizer.pad_id)
    feeds = {name: batch[name] for name in input_names}
    session = ort.InferenceSession(str(onnx_path), session_options(None), providers=[CPU])
    (onnx_out,) = session.run([OUTPUT_NAME], feeds)
    torch_out = _torch_text.reference_vectors(module, _torch_inputs(batch, input_names)).numpy()
    real = batch["attention_mask"].astype(bool)
    cosine = np.sum(onnx_out * torch_out, axis=-1)[real] / np.maximum(
        np.linalg.norm(onnx_out, axis=-1)[real] * np.linalg.norm(torch_out, axis=-1)[real], 1e-12)
    return ParityFigures(min_token_cosine=float(np.min(cosine)),
                         max_abs_diff=float(np.max(np.abs(onnx_out - torch_out)[real])),
                         texts=len(PARITY_TEXTS), tokens=int(real.sum()))


def _sha256_files(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename into place; an empty out_dir is replaced, anything else is refused."""
    _require_free(out_dir)
    try:
        os.rename(tmp, out_dir)
    except OSError as exc:  # someone wrote out_dir meanwhile
        raise FailedPrecondition(f"{out_dir} appeared while exporting and is not empty; "
                                 "remove it or export elsewhere") from exc
