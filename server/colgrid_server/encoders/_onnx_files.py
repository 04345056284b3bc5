"""ONNX graphs placed into an encoder directory, weights over protobuf's 2 GB limit kept outside.

The trace exporter writes a large model as one file per tensor beside the graph; serving and the
encoder identity want a small, fixed set of files, so a graph that needs external data keeps its
weights in one `<graph>.data` file next to it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

_LIMIT = 1_800_000_000  # bytes; below protobuf's 2 GiB with room for the graph itself


def place_graph(exported: Path, directory: Path) -> tuple[str, ...]:
    """Move the graph at `exported` (alone in its own folder, with any per-tensor files) into
    `directory` under the same name; returns the external data file names it needs there."""
    target = directory / exported.name
    model = onnx.load(str(exported), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if not external and exported.stat().st_size < _LIMIT:
        os.replace(exported, target)
        shutil.rmtree(exported.parent, ignore_errors=True)
        return ()
    model = onnx.load(str(exported), load_external_data=True)
    data = f"{exported.name}.data"
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    shutil.rmtree(exported.parent, ignore_errors=True)
    return (data,) if (directory / data).is_file() else ()  # small tensors stay inline
