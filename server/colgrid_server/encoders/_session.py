"""ONNX Runtime sessions with execution providers chosen at run time.

onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU and its libraries are present,
so "listed" is not "usable": the session is created and `get_providers()` says what it got.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from colgrid_server.errors import FailedPrecondition, InvalidArgument

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# Present when an NVIDIA driver is loaded; without it trying CUDA only prints library errors.
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if threads < 1:
            raise InvalidArgument(f"threads must be at least 1, got {threads}", field="threads")
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: fallbacks are reported through `providers`
    return options


def create_session(model: Path, *, threads: int | None = None,
                   providers: Sequence[str] | None = None) -> ort.InferenceSession:
    """A session on CUDA when it actually works, else CPU; or on `providers` as given, in which
    case the first one must be active (later ones are fallbacks for nodes it cannot run)."""
    available = ort.get_available_providers()
    options = session_options(threads)
    if providers is None:
        wanted = [CUDA, CPU] if CUDA in available and _NVIDIA_DRIVER.exists() else [CPU]
        # Without a usable CUDA this falls back to a working CPU session by itself.
        return ort.InferenceSession(str(model), options, providers=wanted)
    wanted = list(providers)
    if not wanted:
        raise InvalidArgument("providers must name at least one execution provider", field="providers")
    unknown = [p for p in wanted if p not in available]
    if unknown:
        raise InvalidArgument(f"execution providers {unknown} are not in this onnxruntime build "
                              f"(available: {available})", field="providers")
    session = ort.InferenceSession(str(model), options, providers=wanted)
    if wanted[0] not in session.get_providers():
        raise FailedPrecondition(f"{wanted[0]} was requested but could not start (running on "
                                 f"{session.get_providers()}); check the GPU, driver and CUDA/cuDNN libraries")
    return session
