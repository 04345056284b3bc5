"""The PyTorch side of ColQwen2 export: load (merging LoRA adapters), and graph-friendly modules.

Imported only by export (torch, transformers, peft, colpali-engine live here). The modules reuse
the checkpoint's own layers and weights; only the data-dependent glue is rewritten:

- vision attention runs per image on a padded batch with a key-padding bias, instead of
  splitting one packed sequence by `cu_seqlens` (`torch.split(lengths.tolist())` either bakes
  the sample's sizes into the graph or stops the exporter);
- vision rotary positions and the language model's M-RoPE positions are graph inputs,
  computed in numpy at serve time (`_qwen2_vl_positions`);
- image embeddings enter the token sequence by a gather over the running count of image
  tokens, instead of `masked_scatter` over the whole batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from colgrid_server.encoders._torch_loading import LoadedModel, load_model, project_vectors


def load_colqwen2(checkpoint: Path, base_model: str | Path | None = None) -> LoadedModel:
    """A local ColQwen2 checkpoint, or a LoRA adapter directory over a base, merged."""
    from colpali_engine.models import ColQwen2, ColQwen2Processor

    return load_model(ColQwen2, ColQwen2Processor, checkpoint, base_model)


class TextGraph(nn.Module):
    """input_ids, attention_mask -> per-token vectors: ColQwen2 on text (queries, text documents).
    Positions are 0..L-1 over the padded row as in PyTorch; RoPE depends only on differences, so
    left padding does not change the real tokens' vectors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.language_model(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
        return project_vectors(self.model, hidden, attention_mask)


class ImageGraph(nn.Module):
    """One image per sequence, batched:

    input_ids, attention_mask  (B, L)      the prompt with the image token repeated per merged patch
    position_ids               (3, B, L)   M-RoPE positions (numpy `rope_positions`)
    pixel_values               (B, P, D)   patches in merge-block order, zero-padded to P
    patch_positions            (B, P, 2)   (row, col) per patch (numpy `vision_positions`)
    patch_mask                 (B, P)      1 for real patches, 0 for padding
    -> (B, L, dim) vectors, padded rows zero.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.image_token_id = int(model.config.image_token_id)

    def _vision(self, pixel_values: torch.Tensor, patch_positions: torch.Tensor,
                patch_mask: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        batch, patches, width = pixel_values.shape
        x = visual.patch_embed(pixel_values.reshape(-1, width)).reshape(batch, patches, -1)
        # Axial 2-D rotary embedding: (row freqs, col freqs), twice, over the head dim.
        freqs = (patch_positions.unsqueeze(-1).float() * visual.rotary_pos_emb.inv_freq).flatten(-2)
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(-2)  # (B, P, 1, head_dim)
        cos, sin = angles.cos(), angles.sin()
        # Keys of padding patches get the most negative float: real patches never attend to them.
        bias = (1.0 - patch_mask.to(x.dtype))[:, None, None, :] * torch.finfo(x.dtype).min
        for block in visual.blocks:
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, bias)
            x = x + block.mlp(block.norm2(x))
        merger = visual.merger
        return merger.mlp(merger.ln_q(x).reshape(batch, -1, merger.hidden_size))  # (B, P / merge², hidden)

    @staticmethod
    def _attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        batch, patches, _ = x.shape
        q, k, v = attn.qkv(x).reshape(batch, patches, 3, attn.num_heads, -1).unbind(2)  # (B, P, H, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, P, hd)
        weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + bias
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, patches, -1)
        return attn.proj(out)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                pixel_values: torch.Tensor, patch_positions: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        language = self.model.language_model
        image_embeds = self._vision(pixel_values, patch_positions, patch_mask)
        embeds = language.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        # k-th image token of a row takes that row's k-th merged patch embedding.
        index = (torch.cumsum(is_image.to(torch.int64), dim=1) - 1).clamp(min=0)
        gathered = torch.gather(image_embeds, 1, index.unsqueeze(-1).expand(-1, -1, image_embeds.shape[-1]))
        embeds = torch.where(is_image.unsqueeze(-1), gathered.to(embeds.dtype), embeds)
        hidden = language(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return project_vectors(self.model, hidden, attention_mask)
