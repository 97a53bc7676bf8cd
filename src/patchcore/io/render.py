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


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours; NaN (not seen by the model) -> grey."""
    unseen = np.isnan(values)
    v = np.clip(np.where(unseen, 0.0, values), 0.0, 1.0)
    channels = [np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)]
    colours = (np.stack(channels, axis=-1) * 255).round().astype(np.uint8)
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
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    if mask is not None and mask.any():
        edge = mask & ~_erode(mask)
        out[edge] = 255.0
    return out.round().clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    # A pixel stays if all 3x3 neighbours are set: -maxpool(-x) is a min filter.
    eroded = -torch.nn.functional.max_pool2d(-t, 3, stride=1, padding=1)
    return eroded[0, 0].numpy() > 0.5
