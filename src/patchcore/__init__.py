"""patchcore: find and localise defects after training on defect-free images only.

PatchCore, Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

Layers (each imports only from those before it; tests/test_architecture.py enforces it):
errors, config -> core (algorithms on arrays) -> backbones, io -> estimator, runtime -> evaluation -> app.
This module is the public facade; no module inside the package imports it. The estimator (torch) is
imported on first use (PEP 562), so `import patchcore.runtime` on a line PC never imports torch.
"""
from ._version import __version__
from .config import PatchCoreConfig
from .errors import (
                     ConfigError,
                     DatasetError,
                     ImageReadError,
                     InputError,
                     ModelFileError,
                     NotFittedError,
                     PatchCoreError,
                     WeightsUnavailableError,
)

_ESTIMATOR = ("FittedState", "PatchCore", "PatchCoreEnsemble", "PatchCoreResult", "load_model")

__all__ = ["PatchCore", "PatchCoreConfig", "PatchCoreResult", "PatchCoreEnsemble", "load_model", "FittedState",
           "PatchCoreError", "ConfigError",
           "DatasetError", "ImageReadError", "InputError", "ModelFileError", "NotFittedError",
           "WeightsUnavailableError", "__version__"]


def __getattr__(name: str):
    if name in _ESTIMATOR:
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module 'patchcore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ESTIMATOR))
