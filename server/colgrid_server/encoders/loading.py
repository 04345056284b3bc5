"""Load any exported encoder directory by the kind its encoder.json records."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from colgrid_server.encoders.onnx_multimodal import MultimodalEncoder, load_multimodal_encoder
from colgrid_server.encoders.onnx_text import TextEncoder, load_encoder
from colgrid_server.encoders.spec import MULTIMODAL_KINDS, load_spec


def load_any_encoder(path: str | Path, *, threads: int | None = None,
                     providers: Sequence[str] | None = None) -> TextEncoder | MultimodalEncoder:
    """A TextEncoder (colbert-style text) or a MultimodalEncoder (ColQwen2, ColPali): both
    encode queries and text documents; only the multimodal one encodes images."""
    directory = Path(path)
    if load_spec(directory).kind in MULTIMODAL_KINDS:
        return load_multimodal_encoder(directory, threads=threads, providers=providers)
    return load_encoder(directory, threads=threads, providers=providers)


def encodes_images(encoder: object) -> bool:
    return callable(getattr(encoder, "encode_images", None))
