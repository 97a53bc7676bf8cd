"""What `fit` learns: the schema lives in io/fitted_state.py (torch-free, shared with patchcore.runtime)."""
from ..io.fitted_state import FittedState, config_from_file

__all__ = ["FittedState", "config_from_file"]
