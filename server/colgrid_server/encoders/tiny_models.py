"""Test support: tiny random-initialised ColQwen2 / ColPali checkpoints built offline.

They have the real architectures, processors and file layouts (so export and serving run
exactly as for vidore/colqwen2-v1.0 or vidore/colpali-v1.3) at a few hundred thousand
parameters, with a byte-level BPE tokenizer trained here. Their vectors mean nothing; they exist
so tests can export, serve and compare against PyTorch in seconds. Needs torch, transformers,
tokenizers and colpali-engine (the export extras); never imported by the serving path.
"""
from __future__ import annotations

import os
from pathlib import Path

# Everything is built locally; nothing should reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Enough text for merges of common words; the rest falls back to the 256 byte tokens.
_CORPUS = (
    "Describe the image. user assistant",
    "Quarterly profit margins rose in the third quarter; the line chart shows revenue by month.",
    "Find the table labelled operating expenses and the scanned invoice with a total.",
    "The quick brown fox jumps over the lazy dog. What is late interaction retrieval?",
)
TINY_MAX_PIXELS = 28 * 28 * 64  # at most 64 merged patches per image: small graphs, quick tests
TINY_MIN_PIXELS = 56 * 56


GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
TINY_SIGLIP_IMAGE_SIZE = 56  # 4 x 4 patches of 14 pixels (vidore/colpali-v1.3: 448, 32 x 32)


def _byte_level_bpe(vocab_size: int, special_tokens: tuple[str, ...], bos: str | None = None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(_CORPUS) * 8, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if bos is not None:  # Gemma's tokenizer puts <bos> first
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def tiny_colqwen2_parts(seed: int = 0, *, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS):
    """(model, processor): a random ColQwen2 (text hidden 64, 2 layers, vision depth 2, eager
    attention) and its ColQwen2Processor (tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)."""
    import torch
    from colpali_engine.models import ColQwen2, ColQwen2Processor
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    bpe = _byte_level_bpe(300, QWEN_SPECIAL_TOKENS)
    ids = {t: bpe.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    processor = ColQwen2Processor(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
                                  tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": bpe.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            # head_dim 16: the (temporal, height, width) sections must sum to head_dim / 2.
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    # Eager attention: sdpa turns left-padded rows into NaN (see shared/notes/onnx-export.md).
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = ColQwen2(config).eval()
    return model, processor


def build_tiny_colqwen2(directory: str | Path, seed: int = 0, *, min_pixels: int = TINY_MIN_PIXELS,
                        max_pixels: int = TINY_MAX_PIXELS) -> Path:
    """Save a tiny random ColQwen2 checkpoint (weights, config, tokenizer, processor) to `directory`."""
    from colgrid_server.encoders._torch_text import quiet_transformers

    directory = Path(directory)
    with quiet_transformers():
        model, processor = tiny_colqwen2_parts(seed, min_pixels=min_pixels, max_pixels=max_pixels)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return directory


def build_tiny_colqwen2_adapter(base_dir: str | Path, adapter_dir: str | Path, seed: int = 1) -> Path:
    """A LoRA adapter over the checkpoint at `base_dir`, laid out as vidore/colqwen2-v1.0 is
    (adapter_config.json + adapter weights + processor files, `custom_text_proj` saved whole).
    LoRA B matrices are random (not zero, as fresh adapters are) so merging visibly matters."""
    import torch
    from colpali_engine.models import ColQwen2, ColQwen2Processor
    from peft import LoraConfig, get_peft_model

    from colgrid_server.encoders._torch_text import quiet_transformers

    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    with quiet_transformers():
        model = ColQwen2.from_pretrained(base_dir, attn_implementation="eager").eval()
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian",
                          target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)$",
                          modules_to_save=["custom_text_proj"])
        peft_model = get_peft_model(model, lora)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        peft_model.save_pretrained(adapter_dir)
        ColQwen2Processor.from_pretrained(base_dir).save_pretrained(adapter_dir)
    return adapter_dir


def tiny_colpali_parts(seed: int = 0, *, image_size: int = TINY_SIGLIP_IMAGE_SIZE):
    """(model, processor): a random ColPali (SigLIP hidden 32, 2 layers, patch 14; Gemma hidden 64,
    2 layers, eager attention) and its ColPaliProcessor (tokenizer, SiglipImageProcessor)."""
    import torch
    from colpali_engine.models import ColPali, ColPaliProcessor
    from transformers import PaliGemmaConfig, PreTrainedTokenizerFast, SiglipImageProcessor

    bpe = _byte_level_bpe(300, GEMMA_SPECIAL_TOKENS, bos="<bos>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.image_seq_length = (image_size // 14) ** 2  # PaliGemmaProcessor requires it
    # The processor adds <image> and ~1,150 <loc>/<seg> tokens: size the vocabulary after it.
    processor = ColPaliProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(processor.tokenizer)
    ids = {t: bpe.token_to_id(t) for t in GEMMA_SPECIAL_TOKENS}
    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size, "patch_size": 14},
        text_config={"model_type": "gemma", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                     "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"]},
        image_token_index=processor.image_token_id, vocab_size=vocab, projection_dim=64, hidden_size=64)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = ColPali(config).eval()
    return model, processor


def build_tiny_colpali(directory: str | Path, seed: int = 0, *, image_size: int = TINY_SIGLIP_IMAGE_SIZE) -> Path:
    """Save a tiny random ColPali checkpoint (weights, config, tokenizer, processor) to `directory`."""
    from colgrid_server.encoders._torch_text import quiet_transformers

    directory = Path(directory)
    with quiet_transformers():
        model, processor = tiny_colpali_parts(seed, image_size=image_size)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return directory
