"""The PyTorch side of ColPali export: load (merging LoRA adapters), and graph-friendly modules.

Imported only by export. ColPali's forward runs PaliGemma's LM head (full-vocabulary logits,
and after `from_pretrained` its weight can stay on the `meta` device) only to read the decoder's
last hidden state; these modules take that state from the base PaliGemma model directly.
Images are fixed-size here, so nothing data-dependent needs to leave the graph. The image graph
takes `token_type_ids`: all-zero ids make the image + prompt prefix attend bidirectionally, as
the processor's batch does; without them the mask turns causal and the vectors change.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from colgrid_server.encoders._torch_loading import LoadedModel, load_model, project_vectors


def load_colpali(checkpoint: Path, base_model: str | Path | None = None) -> LoadedModel:
    """A local ColPali checkpoint, or a LoRA adapter directory over a base, merged."""
    from colpali_engine.models import ColPali, ColPaliProcessor

    return load_model(ColPali, ColPaliProcessor, checkpoint, base_model)


class TextGraph(nn.Module):
    """input_ids, attention_mask -> per-token vectors (queries, text documents): causal, as
    colpali-engine's process_texts batch (no token_type_ids) runs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model.model(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        return project_vectors(self.model, hidden, attention_mask)


class ImageGraph(nn.Module):
    """input_ids, attention_mask, token_type_ids (B, L); pixel_values (B, 3, H, W) -> (B, L, dim)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                        token_type_ids=token_type_ids, use_cache=False).last_hidden_state
        return project_vectors(self.model, hidden, attention_mask)
