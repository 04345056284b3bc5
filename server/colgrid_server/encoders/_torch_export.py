"""torch.onnx.export and reference runs for the multimodal graphs (export only: imports torch)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def export_onnx(module: torch.nn.Module, sample: dict[str, torch.Tensor], path: Path, output_name: str,
                axes: dict[str, dict[int, str]]) -> None:
    """Trace exporter, opset 17: its graphs ran about 2x faster in ORT than dynamo's here, and
    with positions and grids as inputs nothing data-dependent is left to trace."""
    names = list(sample)
    module.eval()
    with warnings.catch_warnings():
        # The trace exporter warns about itself and about constants it folds (checked by parity).
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(module, tuple(sample[n] for n in names), str(path), dynamo=False, opset_version=17,
                              input_names=names, output_names=[output_name], dynamic_axes=axes,
                              do_constant_folding=True)
    module.eval()  # torch.onnx.export can leave the module in training mode


def run_torch(model: torch.nn.Module, batch) -> np.ndarray:
    """The colpali-engine model's own forward on its processor's batch: the reference."""
    model.eval()
    inputs = {key: value for key, value in batch.items() if key != "labels"}  # PaliGemma's training labels
    with torch.inference_mode():
        return model(**inputs).float().numpy()
