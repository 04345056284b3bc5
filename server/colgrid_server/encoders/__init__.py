"""Encoders: export checkpoints to ONNX directories, load them, encode text to multi-vectors.

Serving (`load_encoder`, `TextEncoder`) needs only onnxruntime, tokenizers and numpy; export
(`export_text_encoder`, `ensure_default_encoder`) imports torch and transformers when it runs.
"""
from colgrid_server.encoders.bundled import DEFAULT_ENCODER_NAME, bundled_checkpoint, ensure_default_encoder
from colgrid_server.encoders.export_text import ExportReport, export_text_encoder
from colgrid_server.encoders.onnx_text import TextEncoder, load_encoder
from colgrid_server.encoders.spec import EncoderSpec, ParityFigures, encoder_id, load_spec, write_spec
from colgrid_server.encoders.types import EncodedText

__all__ = [
    "DEFAULT_ENCODER_NAME",
    "EncodedText",
    "EncoderSpec",
    "ExportReport",
    "ParityFigures",
    "TextEncoder",
    "bundled_checkpoint",
    "encoder_id",
    "ensure_default_encoder",
    "export_text_encoder",
    "load_encoder",
    "load_spec",
    "write_spec",
]
