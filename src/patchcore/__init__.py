"""patchcore: find and localise defects after training on defect-free images only.

PatchCore, Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022.
"""
__version__ = "0.1.0"

from .config import PatchCoreConfig  # noqa: E402
from .images import ImageReadError  # noqa: E402
from .model import NotFittedError, PatchCore, PatchCoreResult  # noqa: E402
from .model_file import ModelFileError  # noqa: E402
from .backbones import WeightsUnavailableError  # noqa: E402

__all__ = ["PatchCore", "PatchCoreConfig", "PatchCoreResult", "ImageReadError", "ModelFileError",
           "NotFittedError", "WeightsUnavailableError", "__version__"]
