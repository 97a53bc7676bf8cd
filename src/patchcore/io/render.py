"""Heatmap and overlay pictures for people looking at results (no plotting library needed)."""
from __future__ import annotations

import numpy as np
import torch

# Control points of a perceptually ordered dark-blue -> cyan -> yellow -> red map.
_STOPS = np.array([
    [0.00, 0.05, 0.03, 0.25],
    [0.25, 0.10, 0.35, 0.85],
    [0.50, 0.10, 0.80, 0.80],
    [0.75, 0.95, 0.85, 0.15],
    [1.00, 0.80, 0.05, 0.05],
])


UNSEEN_GREY = 128  # heatmap colour, and mask value, of pixels the model never saw (NaN in the map)


_LEVELS = 4096  # colour table entries: a step of 1/4095 is far below one grey level of the 8-bit output
_TABLE = (np.stack([np.interp(np.linspace(0, 1, _LEVELS), _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)],
                   axis=-1) * 255).round().astype(np.uint8)


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours; NaN (not seen by the model) -> grey.

    A table lookup: a 20-megapixel map costs one uint16 index image, not float64 channels."""
    values = np.asarray(values, dtype=np.float32)
    unseen = np.isnan(values)
    index = np.clip(np.nan_to_num(values, nan=0.0) * (_LEVELS - 1) + 0.5, 0, _LEVELS - 1).astype(np.uint16)
    colours = _TABLE[index]
    colours[unseen] = UNSEEN_GREY
    return colours


def normalise_map(anomaly_map: np.ndarray, threshold: float | None,
                  value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map scores to [0, 1] on a scale shared by all images of a model, so colours compare across images.

    With a calibrated pixel threshold, the threshold sits at the middle of the colour scale (0.5) and
    half of it at the bottom. Without one, `value_range` (or the map's own range) is used.
    """
    if threshold is not None and threshold > 0:
        low, high = 0.5 * threshold, 1.5 * threshold
    elif value_range is not None:
        low, high = value_range
    else:
        low, high = float(np.nanmin(anomaly_map)), float(np.nanmax(anomaly_map))
    return (anomaly_map - low) / max(high - low, 1e-12)


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """Blend heat colours over the (resized, cropped) input image; outline the predicted mask in white."""
    out = image.astype(np.float32)
    out *= 1 - alpha
    out += alpha * heat
    np.rint(out, out=out)
    out = out.astype(np.uint8)  # in [0, 255]: a convex blend of two uint8 pictures
    if mask is not None and mask.any():
        out[mask & ~_erode(mask)] = 255
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    # A pixel stays if all 3x3 neighbours are set: -maxpool(-x) is a min filter.
    eroded = -torch.nn.functional.max_pool2d(-t, 3, stride=1, padding=1)
    return eroded[0, 0].numpy() > 0.5
