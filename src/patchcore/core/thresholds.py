"""Decision thresholds from held-out nominal training images (never from test images).

PatchCore itself gives scores, not decisions; a line needs a good/defect rule. We hold out a seeded share
of the training images from the memory bank, score them like test images, and put the threshold above
their scores.
"""
from __future__ import annotations

import torch


def nominal_threshold(nominal_scores: list[float]) -> float:
    """Decision threshold from held-out nominal scores: mean + 3 std (about 0.1% false alarms if
    nominal scores are roughly normal), and never below the largest held-out score. The max alone
    is too tight when only a few images are held out."""
    values = torch.tensor(nominal_scores, dtype=torch.float64)
    spread = float(values.std()) if values.numel() > 1 else 0.0
    return float(max(float(values.max()), float(values.mean()) + 3.0 * spread))


def calibration_split(items: list, ratio: float, seed: int) -> tuple[list, list]:
    """(bank items, held-out items): round(ratio * n) items held out (seeded), at least min(5, n // 4)
    since a threshold from two or three scores is mostly noise; none if ratio is 0 or n < 10."""
    count = max(int(round(ratio * len(items))), min(5, len(items) // 4))
    if ratio <= 0 or len(items) < 10:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    held_out = set(order[:count])
    return ([im for i, im in enumerate(items) if i not in held_out],
            [im for i, im in enumerate(items) if i in held_out])
