"""What `fit` learns, as one schema: fit builds it, save writes it, load reads it back.

The model file keeps the layout of format version 1 (a "fitted" JSON object beside the safetensors
bank), so files written before this schema existed load unchanged, byte for byte the same on save.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ModelFileError


@dataclass(frozen=True)
class FittedState:
    """The learned state of a PatchCore model. Frozen: a model swaps it as a whole, never edits it."""

    memory_bank: torch.Tensor  # (M, D) float32: the coreset-reduced memory bank M_C (section 2)
    distance_scale: float  # T of eq. 7: the bank's median nearest-neighbour distance
    image_threshold: float | None  # set from held-out training images; None: no decisions
    pixel_threshold: float | None
    calibration_scores: tuple[float, ...]  # image scores of the held-out training images
    grid: tuple[int, int]  # patch grid (h, w) of the training images
    input_size: tuple[int, int]  # model input (H, W) after resize and crop
    n_train_images: int  # images in the bank (held-out ones excluded)
    n_train_patches: int  # patches before coreset reduction
    backbone_weights_sha256: str  # the weights the bank was computed with

    # JSON field name -> attribute, for the values saved in the "fitted" object.
    _SAVED = ("distance_scale", "image_threshold", "pixel_threshold", "calibration_scores", "grid",
              "input_size", "n_train_images", "n_train_patches")

    def fitted_header(self) -> dict[str, Any]:
        """The JSON "fitted" object of the model file."""
        values = {name: getattr(self, name) for name in self._SAVED}
        for name in ("calibration_scores", "grid", "input_size"):
            values[name] = list(values[name])
        return values

    def replace(self, **changes: Any) -> FittedState:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], path: Any) -> FittedState:
        """Rebuild from a model file's tensors and header; a missing or mistyped field is a ModelFileError."""
        try:
            fitted = header["fitted"]
            return cls(
                memory_bank=tensors["memory_bank"],
                distance_scale=float(fitted["distance_scale"]),
                image_threshold=_optional_float(fitted.get("image_threshold")),
                pixel_threshold=_optional_float(fitted.get("pixel_threshold")),
                calibration_scores=tuple(float(s) for s in fitted.get("calibration_scores", [])),
                grid=_pair(fitted["grid"]),
                input_size=_pair(fitted["input_size"]),
                n_train_images=int(fitted["n_train_images"]),
                n_train_patches=int(fitted["n_train_patches"]),
                backbone_weights_sha256=str(header["backbone_weights_sha256"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{path}: incomplete or invalid model file (field {err})") from None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _pair(value: Any) -> tuple[int, int]:
    h, w = value
    return int(h), int(w)
