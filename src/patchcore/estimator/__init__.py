"""The estimator layer: PatchCore composes the core algorithms with a backbone and I/O."""
from .ensemble import PatchCoreEnsemble, build_model, load_model
from .model import FitReport, PatchCore, PatchCoreResult, PredictedBatch
from .state import FittedState

__all__ = ["FitReport", "FittedState", "PatchCore", "PatchCoreEnsemble", "PatchCoreResult", "PredictedBatch",
           "build_model", "load_model"]
