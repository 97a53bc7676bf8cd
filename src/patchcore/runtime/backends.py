"""Inference engines for the exported embedding graph: normalised float32 (B, 3, H, W) -> (B, h, w, D).

- onnxruntime (default): CPU; "onnxruntime-cuda" asks for its CUDA provider and fails if it is absent.
- openvino: CPU, precision forced to fp32 (OpenVINO's CPU default on recent Intel CPUs is bf16, silently).
Reduced precision is only ever an explicit choice: precision="bf16" (OpenVINO), or the int8 graph written
by `patchcore export --int8` (static QDQ, calibrated on the model's own training images; Runtime.load
picks it with precision="int8" and runs it on either engine).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "openvino")
PRECISIONS = ("fp32", "bf16")


class Session:
    """One loaded graph on one engine; `run` is safe to call from several threads (both engines allow it)."""

    def __init__(self, graph: Path, backend: str = "onnxruntime", *, threads: int | None = None,
                 precision: str = "fp32"):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown runtime backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and backend != "openvino":
            raise ConfigError(f"precision {precision} is an OpenVINO option; onnxruntime runs the graph as exported")
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        self.backend, self.precision, self.threads = backend, precision, threads
        if backend == "openvino":
            self._run = _openvino(graph, threads, precision)
        else:
            self._run = _onnxruntime(graph, threads, cuda=backend == "onnxruntime-cuda")

    def run(self, images: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(images, dtype=np.float32))


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(f"this backend needs the package {package}: pip install 'patchcore[{extra}]'")


def _onnxruntime(graph: Path, threads: int | None, *, cuda: bool):
    try:
        import onnxruntime as ort
    except ImportError:
        raise _missing("onnxruntime", "runtime") from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # onnxruntime's worker threads spin while waiting, as OpenMP's do by default: on a shared or busy CPU
        # that costs as much as it did torch (README); the same switch turns it off for both.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("onnxruntime-cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(graph), sess_options=options, providers=providers)
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _openvino(graph: Path, threads: int | None, precision: str):
    try:
        import openvino as ov
    except ImportError:
        raise _missing("openvino", "openvino") from None
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(graph), "CPU", config)
    requests = compiled  # compiled(...) creates a request per call: thread-safe

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(requests(images)[0])

    return run
