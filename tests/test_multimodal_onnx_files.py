"""Graphs whose weights live outside the .onnx file (real ColPali/ColQwen2: over 2 GB) end up with
one `<graph>.data` file beside them, and load and run from there."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from colgrid_server.encoders._onnx_files import place_graph


def _matmul_graph(weights: list[np.ndarray]) -> onnx.ModelProto:
    nodes, inputs = [], "x"
    for i, _ in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [inputs, f"w{i}"], [f"y{i}"]))
        inputs = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info(inputs, TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_per_tensor_weight_files_become_one_data_file_that_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((32, 32)).astype(np.float32) for _ in range(3)]
    exported = tmp_path / "export" / "image.onnx"
    exported.parent.mkdir()
    # As the trace exporter writes large models: one file per tensor beside the graph.
    onnx.save_model(_matmul_graph(weights), str(exported), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(exported.parent.iterdir())) == 4
    target = tmp_path / "encoder"
    target.mkdir()
    assert place_graph(exported, target) == ("image.onnx.data",)
    assert sorted(p.name for p in target.iterdir()) == ["image.onnx", "image.onnx.data"]
    assert not exported.parent.exists()
    x = rng.standard_normal((1, 32)).astype(np.float32)
    (out,) = ort.InferenceSession(str(target / "image.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.allclose(out, x @ weights[0] @ weights[1] @ weights[2], atol=1e-4)


def test_a_self_contained_graph_is_moved_as_it_is(tmp_path: Path) -> None:
    exported = tmp_path / "export" / "text.onnx"
    exported.parent.mkdir()
    onnx.save_model(_matmul_graph([np.eye(32, dtype=np.float32)]), str(exported))
    content = exported.read_bytes()
    target = tmp_path / "encoder"
    target.mkdir()
    assert place_graph(exported, target) == ()
    assert (target / "text.onnx").read_bytes() == content
