"""patchcore: find and localise defects after training on defect-free images only.

PatchCore, Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.

Layers (each imports only from those before it; tests/test_architecture.py enforces it):
errors, config -> core (algorithms on tensors) -> backbones, io -> estimator -> evaluation -> app.
This module is the public facade; no module inside the package imports it.
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
from .estimator import FittedState, PatchCore, PatchCoreResult

__all__ = ["PatchCore", "PatchCoreConfig", "PatchCoreResult", "FittedState", "PatchCoreError", "ConfigError",
           "DatasetError", "ImageReadError", "InputError", "ModelFileError", "NotFittedError",
           "WeightsUnavailableError", "__version__"]
