"""What `fit` learns, as one schema: fit builds it, save writes it, load reads it back.

The model file keeps the layout of format version 1 (a "fitted" JSON object beside the safetensors
bank), so files written before this schema existed load unchanged, byte for byte the same on save.

Torch-free: the estimator holds torch tensors in it, the runtime (patchcore.runtime) numpy arrays, and both
read and check a model file with this one schema (array-api-compat for the two array checks).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from array_api_compat import array_namespace

from ..config import MAX_BANK_ROWS, MAX_EMBEDDING_DIM, PatchCoreConfig
from ..errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    import torch


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
    region: torch.Tensor | None = None  # (H', W') bool inspection region at the model input; None: all

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

    # The tensors of a version-1 model file: name -> (safetensors dtype, ndim).
    TENSORS = {"memory_bank": ("F32", 2)}
    # Written only by models that use them; a reader that does not know them refuses the config field.
    OPTIONAL_TENSORS = {"region": ("U8", 2)}

    @classmethod
    def from_file(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], path: Any) -> FittedState:
        """Rebuild from a model file's tensors and header, checked against the schema and its bounds
        (`validate`): a missing, mistyped or out-of-range field is one ModelFileError naming the file and
        the field, never a KeyError."""
        fitted = header.get("fitted")
        if not isinstance(fitted, dict):
            raise _invalid(path, "fitted", "missing or not a JSON object")
        bank = tensors.get("memory_bank")
        if bank is None:
            raise _invalid(path, "memory_bank", "tensor missing")
        unexpected = sorted(set(tensors) - set(cls.TENSORS) - set(cls.OPTIONAL_TENSORS))
        if unexpected:
            raise _invalid(path, "tensors", f"unexpected tensors {unexpected} "
                                            f"(format version 1 holds {sorted(cls.TENSORS | cls.OPTIONAL_TENSORS)})")
        region = tensors.get("region")
        sha = header.get("backbone_weights_sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise _invalid(path, "backbone_weights_sha256", f"must be 64 hex digits, got {sha!r}")
        field_values = {}
        for name, parse in (("distance_scale", _number), ("image_threshold", _optional_number),
                            ("pixel_threshold", _optional_number), ("calibration_scores", _numbers),
                            ("grid", _pair), ("input_size", _pair), ("n_train_images", _count),
                            ("n_train_patches", _count)):
            if name not in fitted and name not in _OPTIONAL:
                raise _invalid(path, f"fitted.{name}", "missing")
            try:
                field_values[name] = parse(fitted.get(name, _OPTIONAL.get(name)))
            except (TypeError, ValueError) as err:
                raise _invalid(path, f"fitted.{name}", str(err)) from None
        if region is not None:
            xp = array_namespace(region)
            region = xp.astype(region, xp.bool)
        state = cls(memory_bank=bank, backbone_weights_sha256=sha, region=region, **field_values)
        state.validate(path, feature_stride=_finest_stride(header))
        return state

    @classmethod
    def check_header(cls, shapes: dict[str, tuple[str, list[int]]], header: dict[str, Any], path: Any) -> None:
        """Before any tensor data is read: the declared tensor shapes against the bounds and the header's own
        fields, so a (sparse) file declaring gigabytes that `validate` would refuse is refused unread."""
        fitted = header.get("fitted") if isinstance(header.get("fitted"), dict) else {}
        rows, dim = shapes["memory_bank"][1]
        if not 1 <= rows <= MAX_BANK_ROWS:
            raise _invalid(path, "memory_bank", f"must have 1 to {MAX_BANK_ROWS} rows, got {rows}")
        if not 1 <= dim <= MAX_EMBEDDING_DIM:
            raise _invalid(path, "memory_bank", f"must have 1 to {MAX_EMBEDDING_DIM} columns, got {dim}")
        try:
            patches, images = _count(fitted.get("n_train_patches")), _count(fitted.get("n_train_images"))
            grid_h, grid_w = _pair(fitted.get("grid"))
            size = _pair(fitted.get("input_size"))
        except (TypeError, ValueError):
            return  # from_file names the field
        if not rows <= patches <= images * grid_h * grid_w:
            raise _invalid(path, "fitted.n_train_patches",
                           f"must be between the bank's {rows} rows and n_train_images x grid = "
                           f"{images * grid_h * grid_w}, got {patches}")
        if "region" in shapes and list(shapes["region"][1]) != list(size):
            raise _invalid(path, "region", f"must be a mask of the input size {list(size)}, got shape "
                                           f"{list(shapes['region'][1])}")

    def validate(self, path: Any = "model", *, feature_stride: int | None = None) -> None:
        """The bounds of a usable state; ModelFileError naming `path` and the field on the first violation.

        Without these, a NaN bank or a zero distance scale scores every image NaN (and every label
        'good'). `feature_stride` (the finest level's) also checks that the grid fits the input size.
        """
        bank = self.memory_bank
        xp = array_namespace(bank)
        if bank.dtype != xp.float32 or bank.ndim != 2:
            raise _invalid(path, "memory_bank", f"must be a 2-D float32 tensor, got {bank.ndim}-D {bank.dtype}")
        rows, dim = bank.shape
        if not 1 <= rows <= MAX_BANK_ROWS:
            raise _invalid(path, "memory_bank", f"must have 1 to {MAX_BANK_ROWS} rows, got {rows}")
        if not 1 <= dim <= MAX_EMBEDDING_DIM:
            raise _invalid(path, "memory_bank", f"must have 1 to {MAX_EMBEDDING_DIM} columns, got {dim}")
        finite = xp.isfinite(bank)
        if not bool(xp.all(finite)):
            raise _invalid(path, "memory_bank", f"{int(xp.sum(xp.astype(~finite, xp.int64)))} values are NaN or "
                                                "infinite")
        if not (math.isfinite(self.distance_scale) and self.distance_scale > 0):
            raise _invalid(path, "fitted.distance_scale",
                           f"must be a positive finite number, got {self.distance_scale}")
        for name in ("image_threshold", "pixel_threshold"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise _invalid(path, f"fitted.{name}", f"must be a finite number or null, got {value}")
        if len(self.calibration_scores) > MAX_CALIBRATION_SCORES:
            raise _invalid(path, "fitted.calibration_scores", f"more than {MAX_CALIBRATION_SCORES} values")
        if not all(math.isfinite(s) for s in self.calibration_scores):
            raise _invalid(path, "fitted.calibration_scores", "NaN or infinite values")
        (height, width), (grid_h, grid_w) = self.input_size, self.grid
        if min(height, width) < 1 or height * width > MAX_INPUT_PIXELS:
            raise _invalid(path, "fitted.input_size", f"must be positive with at most {MAX_INPUT_PIXELS} pixels, "
                                                      f"got {list(self.input_size)}")
        if not (1 <= grid_h <= height and 1 <= grid_w <= width):
            raise _invalid(path, "fitted.grid", f"must be between 1 and the input size {list(self.input_size)}, "
                                                f"got {list(self.grid)}")
        if feature_stride is not None:
            expected = (-(-height // feature_stride), -(-width // feature_stride))  # ceil: what the backbones give
            if abs(grid_h - expected[0]) > 1 or abs(grid_w - expected[1]) > 1:
                raise _invalid(path, "fitted.grid", f"{list(self.grid)} does not fit input size "
                                                    f"{list(self.input_size)} at stride {feature_stride} "
                                                    f"(expected {list(expected)})")
        if self.n_train_images < 1:
            raise _invalid(path, "fitted.n_train_images", f"must be >= 1, got {self.n_train_images}")
        if not rows <= self.n_train_patches <= self.n_train_images * grid_h * grid_w:
            raise _invalid(path, "fitted.n_train_patches",
                           f"must be between the bank's {rows} rows and n_train_images x grid = "
                           f"{self.n_train_images * grid_h * grid_w}, got {self.n_train_patches}")
        if self.region is not None and (tuple(self.region.shape) != tuple(self.input_size)
                                        or not bool(array_namespace(self.region).any(self.region))):
            raise _invalid(path, "region", f"must be a non-empty mask of the input size {list(self.input_size)}, "
                                           f"got shape {list(self.region.shape)}")


# Bounds beyond those of the config (config.py): a state that passes them scores finite numbers.
MAX_CALIBRATION_SCORES = 1 << 20
MAX_INPUT_PIXELS = 20_000 * 20_000  # wider than io.images.MAX_PIXELS (8192^2), which an environment variable can raise
_OPTIONAL = {"image_threshold": None, "pixel_threshold": None, "calibration_scores": []}
_SHA256 = re.compile("[0-9a-f]{64}")


def _invalid(path: Any, name: str, problem: str) -> ModelFileError:
    return ModelFileError(f"{path}: invalid model file: field {name}: {problem}")


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"must be a number, got {value!r}")
    return float(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _numbers(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        raise TypeError(f"must be a list of numbers, got {type(value).__name__}")
    return tuple(_number(v) for v in value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


def _pair(value: Any) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise TypeError(f"must be a list [h, w], got {value!r}")
    return _count(value[0]), _count(value[1])


def _finest_stride(header: dict[str, Any]) -> int | None:
    strides = (header.get("config") or {}).get("feature_strides") if isinstance(header.get("config"), dict) else None
    if isinstance(strides, list) and strides and isinstance(strides[0], int) and strides[0] > 0:
        return strides[0]
    return None


def config_from_file(header: dict[str, Any], path: Any, *, weights: str | None = None) -> PatchCoreConfig:
    """The model file's config, validated (config.py's bounds); `weights` replaces the recorded weights
    path. Any problem is a ModelFileError naming the file and the field."""
    saved = header.get("config")
    if not isinstance(saved, dict):
        raise ModelFileError(f"{path}: invalid model file: field config: missing or not a JSON object")
    saved = dict(saved)
    if weights is not None:
        saved["weights"] = weights
    try:
        return PatchCoreConfig.from_dict(saved)
    except ConfigError as err:
        raise ModelFileError(f"{path}: invalid model file: config: {err}") from None
    except (TypeError, ValueError) as err:  # e.g. a field name that is not a string
        raise ModelFileError(f"{path}: invalid model file: config: {err}") from None
