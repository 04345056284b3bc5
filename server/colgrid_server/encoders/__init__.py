"""Encoders: export checkpoints to ONNX directories, load them, encode text to multi-vectors.

Serving (`load_encoder`, `TextEncoder`; `load_multimodal_encoder`, `MultimodalEncoder` for
ColQwen2/ColPali page images) needs only onnxruntime, tokenizers, numpy and Pillow; export
(`export_text_encoder`, `ensure_default_encoder`, `export_colqwen2`, `export_colpali`) imports
torch, transformers and colpali-engine when it runs. `tiny_models` builds tiny random
checkpoints for tests.
"""
from colgrid_server.encoders.bundled import DEFAULT_ENCODER_NAME, bundled_checkpoint, ensure_default_encoder
from colgrid_server.encoders.export_multimodal import (MultimodalExportReport, export_colpali, export_colqwen2,
                                                       export_multimodal)
from colgrid_server.encoders.export_text import ExportReport, export_text_encoder
from colgrid_server.encoders.loading import encodes_images, load_any_encoder
from colgrid_server.encoders.onnx_multimodal import MultimodalEncoder, load_multimodal_encoder
from colgrid_server.encoders.onnx_text import TextEncoder, load_encoder
from colgrid_server.encoders.spec import (EncoderSpec, ImageParity, ImageSpec, ParityFigures, encoder_id, load_spec,
                                          write_spec)
from colgrid_server.encoders.types import EncodedImage, EncodedText

__all__ = [
    "DEFAULT_ENCODER_NAME",
    "EncodedImage",
    "EncodedText",
    "EncoderSpec",
    "ExportReport",
    "ImageParity",
    "ImageSpec",
    "MultimodalEncoder",
    "MultimodalExportReport",
    "ParityFigures",
    "TextEncoder",
    "bundled_checkpoint",
    "encoder_id",
    "encodes_images",
    "load_any_encoder",
    "ensure_default_encoder",
    "export_colpali",
    "export_colqwen2",
    "export_multimodal",
    "export_text_encoder",
    "load_encoder",
    "load_multimodal_encoder",
    "load_spec",
    "write_spec",
]
