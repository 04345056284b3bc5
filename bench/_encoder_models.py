"""The model variants bench_encoder.py compares, all of the bundled MiniLM export: PyTorch eager
(the module the ONNX graph was traced from, and the same weights with torch's SDPA attention),
ONNX Runtime sessions with different options, the transformer-fused graph, and int8 dynamic
quantisations. Each variant is a callable on one padded batch returning (batch, seq, dim)."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from colgrid_server.encoders import bundled_checkpoint
from colgrid_server.encoders._session import session_options
from colgrid_server.encoders.spec import load_spec

Batch = dict[str, np.ndarray]
Runner = Callable[[Batch], np.ndarray]


@dataclass(frozen=True)
class Graphs:
    """ONNX files of one export: as exported, fused, and int8 variants."""

    exported: Path
    fused: Path
    int8: dict[str, Path]  # name -> quantised graph


def prepare_graphs(encoder_dir: Path, work: Path) -> Graphs:
    """The fused graph (onnxruntime.transformers BERT fusions: embedding + layer norms, attention,
    bias-GELU) and int8 dynamic quantisations (weights int8, activations quantised per batch),
    written once into `work`."""
    spec = load_spec(encoder_dir)
    exported = encoder_dir / spec.document_onnx
    work.mkdir(parents=True, exist_ok=True)
    fused = work / "model.fused.onnx"
    if not fused.is_file():
        from onnxruntime.transformers import optimizer

        heads = _attention_heads()
        model = optimizer.optimize_model(str(exported), model_type="bert", num_heads=heads, hidden_size=spec.dim,
                                         use_gpu=False, opt_level=1)  # fmt: skip
        model.save_model_to_file(str(fused.with_suffix(".tmp")))
        fused.with_suffix(".tmp").rename(fused)
    int8 = {}
    # per-tensor weight scales lose too much on per-token outputs (mean cosine ~0.94 on docstrings);
    # per-channel keeps ~0.99. Fused graphs hold contrib ops shape inference cannot type.
    for name, source, per_channel in (("int8-per-tensor", exported, False), ("int8", exported, True),
                                      ("int8-fused", fused, True)):  # fmt: skip
        target = work / f"model.{name}.onnx"
        if not target.is_file():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = target.with_suffix(".tmp.onnx")
            quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fmt: skip
            tmp.rename(target)
        int8[name] = target
    return Graphs(exported=exported, fused=fused, int8=int8)


def _attention_heads() -> int:
    """Heads of the checkpoint's attention (the fusion needs them); from the bundled config."""
    import json

    config = json.loads((bundled_checkpoint() / "config.json").read_text())
    return int(config["num_attention_heads"])


def encoder_dir_with(encoder_dir: Path, graph: Path, target: Path) -> Path:
    """A copy of the encoder directory whose graph is `graph`: loads with colgrid's own
    load_encoder (tokenizer, spec, serving path unchanged; its id differs)."""
    if (target / "encoder.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = load_spec(encoder_dir)
    for name in {spec.tokenizer_file, "encoder.json"}:
        shutil.copy2(encoder_dir / name, tmp / name)
    shutil.copy2(graph, tmp / spec.document_onnx)
    tmp.rename(target)
    return target


# --- runners ---------------------------------------------------------------------------------


def torch_runner(attention: str) -> Runner:
    """The export's own module (eager attention: what the ONNX graph was traced from), or the
    same checkpoint with another attention implementation ("sdpa": torch's default)."""
    from colgrid_server.encoders import _torch_text

    loaded = _torch_text.load_checkpoint(bundled_checkpoint())
    module = loaded.module
    if attention != "eager":
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(bundled_checkpoint(), local_files_only=True, attn_implementation=attention)
        module = _torch_text.TokenVectors(backbone.eval(), loaded.module.projection).eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.takes_token_type_ids else [])

    def run(batch: Batch) -> np.ndarray:
        with torch.inference_mode():
            return module(**{n: torch.from_numpy(batch[n]) for n in names}).numpy()

    return run


def ort_session(graph: Path, threads: int, *, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                spinning: bool = True) -> ort.InferenceSession:  # fmt: skip
    options = session_options(threads)  # colgrid's serving options, then the variant's changes
    options.graph_optimization_level = level
    if not spinning:
        # Worker threads sleep between runs instead of spinning: frees the core on a shared host.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def ort_runner(session: ort.InferenceSession, *, io_binding: bool = False) -> Runner:
    inputs = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name
    if not io_binding:
        return lambda batch: session.run([output], {n: batch[n] for n in inputs})[0]

    def run_bound(batch: Batch) -> np.ndarray:
        # Inputs bound in place (no copy into ORT-owned buffers), output allocated by ORT on the CPU.
        binding = session.io_binding()
        for n in inputs:
            binding.bind_cpu_input(n, batch[n])
        binding.bind_output(output, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    return run_bound


def variants(graphs: Graphs, threads: int) -> dict[str, Runner]:
    """Every variant at `threads` intra-op threads (torch's global count is set by the caller)."""
    level = ort.GraphOptimizationLevel
    fused = ort_session(graphs.fused, threads)
    return {
        "torch eager": torch_runner("eager"),
        "torch sdpa": torch_runner("sdpa"),
        "ort as served": ort_runner(ort_session(graphs.exported, threads)),
        "ort basic opt": ort_runner(ort_session(graphs.exported, threads, level=level.ORT_ENABLE_BASIC)),
        "ort no opt": ort_runner(ort_session(graphs.exported, threads, level=level.ORT_DISABLE_ALL)),
        "ort fused": ort_runner(fused),
        "ort fused, io binding": ort_runner(fused, io_binding=True),
        "ort fused, no spinning": ort_runner(ort_session(graphs.fused, threads, spinning=False)),
        "ort int8": ort_runner(ort_session(graphs.int8["int8"], threads)),
        "ort int8 fused": ort_runner(ort_session(graphs.int8["int8-fused"], threads)),
    }


FP32_ORT = ("ort as served", "ort basic opt", "ort no opt", "ort fused", "ort fused, io binding", "ort fused, no spinning")
INT8_ORT = ("ort int8", "ort int8 fused")
TORCH = ("torch eager", "torch sdpa")
