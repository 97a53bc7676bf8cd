"""The estimator layer: PatchCore composes the core algorithms with a backbone and I/O."""
from .model import FitReport, PatchCore, PatchCoreResult, PredictedBatch
from .state import FittedState

__all__ = ["FitReport", "FittedState", "PatchCore", "PatchCoreResult", "PredictedBatch"]
