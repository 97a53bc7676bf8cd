"""User-facing errors: one base class, so applications can tell "your input is wrong" (print one line)
from a bug (show the traceback). Anything that is not a PatchCoreError is a bug or an environment
failure (out of memory, a full disk) and must surface with its traceback."""
from __future__ import annotations

from pathlib import Path


class PatchCoreError(Exception):
    """Base of every error caused by what the user gave: input files, model files, weights, config."""


class ConfigError(PatchCoreError, ValueError):
    """A configuration value is out of range or inconsistent; the message names the field."""


class InputError(PatchCoreError, ValueError):
    """Input that cannot be used: an empty folder, an empty image, images of incompatible geometry."""


class ImageReadError(InputError):
    """An input file could not be read as an image; the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelFileError(PatchCoreError, ValueError):
    """A model file is missing, not a patchcore model, of an unknown version, or damaged."""


class WeightsUnavailableError(PatchCoreError, RuntimeError):
    """Pretrained backbone weights are not available here (never replaced by random weights silently)."""


class DatasetError(PatchCoreError, ValueError):
    """An evaluation dataset is missing files or is inconsistent (images without masks, wrong sizes)."""


class NotFittedError(PatchCoreError, RuntimeError):
    """A scoring or saving method was called on a model that has not been fitted or loaded."""


class DeviceError(PatchCoreError, RuntimeError):
    """The requested device is not available (for example --device cuda on a machine without CUDA)."""


class OutputError(PatchCoreError, OSError):
    """An output path cannot be written (a folder where a file is expected, no permission, ...)."""
