"""Load a colpali-engine checkpoint for export, merging a LoRA adapter first (export only).

Real checkpoints such as vidore/colqwen2-v1.0 are LoRA adapters over a base model: the adapter
directory's adapter_config.json names the base (a local path, or a hub id already in the local
cache); `merge_and_unload` folds the adapter into plain weights so the graph is one model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from colgrid_server.encoders._torch_text import quiet_transformers, weight_files
from colgrid_server.errors import EncoderError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # the colpali-engine model, adapters merged, eval mode, float32
    processor: object  # its colpali-engine processor
    source: str
    weight_files: tuple[Path, ...]
    merged_adapter: bool


def load_model(model_class, processor_class, checkpoint: Path, base_model: str | Path | None = None) -> LoadedModel:
    """`checkpoint`: a local model directory, or a LoRA adapter directory (`base_model`
    overrides the base its adapter_config.json names). Eager attention: sdpa turns left-padded
    rows into NaN in PyTorch and ONNX alike."""
    adapter = (checkpoint / ADAPTER_CONFIG).is_file()
    base = None
    with quiet_transformers():
        if adapter:
            from peft import PeftModel

            base = base_model or json.loads((checkpoint / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            if not base:
                raise EncoderError(f"{checkpoint} is a LoRA adapter that names no base model; pass base_model")
            model = model_class.from_pretrained(base, attn_implementation="eager", dtype=torch.float32)
            model = PeftModel.from_pretrained(model, str(checkpoint)).merge_and_unload()
        else:
            model = model_class.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32)
        processor = processor_class.from_pretrained(checkpoint)
    files = sorted(checkpoint.glob("adapter_model*")) if adapter else weight_files(checkpoint)
    source = f"{checkpoint.name} (LoRA adapter merged into {base})" if adapter else checkpoint.name
    return LoadedModel(model=model.eval(), processor=processor, source=source, weight_files=tuple(files),
                       merged_adapter=adapter)


def project_vectors(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """As ColPali/ColQwen2's forward: project, L2-normalise (plain division, as there), zero the
    padded rows."""
    proj = model.custom_text_proj(hidden)
    proj = proj / proj.norm(dim=-1, keepdim=True)
    return proj * attention_mask.unsqueeze(-1).to(proj.dtype)
