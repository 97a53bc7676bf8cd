"""Score without torch: an exported embedding graph (onnxruntime or OpenVINO) + the model file.

    pip install 'patchcore[runtime]'          # onnxruntime, numpy, Pillow, safetensors, array-api-compat
    from patchcore.runtime import Runtime
    runtime = Runtime.load("bottle.model", "bottle.onnx/")
    result = runtime.predict(["part.png"])   # RuntimeResult(scores, maps, labels, masks), numpy

Nothing here imports torch (tests/test_runtime.py runs it where importing torch fails).
"""
from .backends import BACKENDS, Session
from .model import Runtime, RuntimeBatch, RuntimeResult

__all__ = ["BACKENDS", "Runtime", "RuntimeBatch", "RuntimeResult", "Session"]
