"""The PyTorch side of text export: a local checkpoint as a module mapping token ids to
L2-normalised per-token vectors. Imported only by export (torch + transformers live here)."""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Export reads a local directory; make sure nothing reaches for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from colgrid_server.errors import EncoderError  # noqa: E402

# ColBERT's HF checkpoints (HF_ColBERT) keep the projection beside the "bert." weights.
_PROJECTION_PREFIX = "linear."


class TokenVectors(torch.nn.Module):
    """backbone last_hidden_state -> optional linear projection -> L2 normalise, per token."""

    def __init__(self, backbone: torch.nn.Module, projection: torch.nn.Linear | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        if self.projection is not None:
            hidden = self.projection(hidden)
        return torch.nn.functional.normalize(hidden, p=2, dim=-1)


@dataclass(frozen=True)
class LoadedCheckpoint:
    module: TokenVectors
    tokenizer: transformers.PreTrainedTokenizerBase
    dim: int
    takes_token_type_ids: bool
    name_or_path: str


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading chatter (unused-weight notices, its own progress bars: the
    export shows one bar for all steps) while loading."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_checkpoint(checkpoint: Path) -> LoadedCheckpoint:
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        # Eager attention exports as plain MatMul/Softmax, which ORT fuses and runs fastest.
        backbone = AutoModel.from_pretrained(checkpoint, local_files_only=True, attn_implementation="eager")
    backbone.eval()
    projection = load_projection(checkpoint)
    hidden = backbone.config.hidden_size
    if projection is not None and projection.in_features != hidden:
        raise EncoderError(f"{checkpoint}: projection expects {projection.in_features} inputs but the "
                           f"model's hidden size is {hidden}")
    module = TokenVectors(backbone, projection).eval()
    takes_types = "token_type_ids" in inspect.signature(backbone.forward).parameters and bool(
        getattr(backbone.config, "type_vocab_size", 0))
    return LoadedCheckpoint(module=module, tokenizer=tokenizer,
                            dim=projection.out_features if projection is not None else hidden,
                            takes_token_type_ids=takes_types,
                            name_or_path=str(getattr(backbone.config, "_name_or_path", "") or ""))


def load_projection(checkpoint: Path) -> torch.nn.Linear | None:
    """The ColBERT `linear` layer stored in the checkpoint's weights, or None if there is none."""
    tensors = _read_tensors(checkpoint, _PROJECTION_PREFIX)
    weight = tensors.get(_PROJECTION_PREFIX + "weight")
    if weight is None:
        return None
    bias = tensors.get(_PROJECTION_PREFIX + "bias")
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        if bias is not None:
            layer.bias.copy_(bias.float())
    return layer.eval()


def _read_tensors(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix`, from safetensors or pytorch_model.bin (sharded or not)."""
    found: dict[str, torch.Tensor] = {}
    for file in weight_files(checkpoint):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    if key.startswith(prefix):
                        found[key] = fh.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in state.items() if k.startswith(prefix)})
        if found:
            break
    return found


def weight_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, shards listed by their index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (checkpoint / single).is_file():
            return [checkpoint / single]
        if (checkpoint / index).is_file():
            shards = json.loads((checkpoint / index).read_text())["weight_map"].values()
            return [checkpoint / name for name in sorted(set(shards))]
    return []


def reference_vectors(module: TokenVectors, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # torch.onnx.export leaves the module in training mode (dropout on): force eval every time.
    module.eval()
    with torch.inference_mode():
        return module(**inputs)


def export_onnx(module: TokenVectors, sample: dict[str, torch.Tensor], path: Path, output_name: str) -> None:
    names = list(sample)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*names, output_name]}
    with warnings.catch_warnings():
        # The trace exporter warns about itself and about constants it folds (checked by parity).
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(sample[n] for n in names), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=[output_name], dynamic_axes=axes,
                          do_constant_folding=True)
    module.eval()


def versions() -> str:
    return f"torch {torch.__version__}, transformers {transformers.__version__}, opset 17"
