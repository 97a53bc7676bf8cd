"""Streaming full-resolution pixel metrics against the exact ones (metrics.py, itself tested against sklearn)."""
from __future__ import annotations

import numpy as np
import pytest

from patchcore.evaluation.metrics import pixel_metrics
from patchcore.evaluation.pixel_stream import StreamingPixelMetrics


def _case(seed: int, n: int = 6, size: int = 40):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    maps = rng.normal(0, 1, (n, size, size)).astype(np.float32)
    for i in range(1, n):  # image 0 is good; the others get one or two rectangular defects
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 8, 2)
            masks[i, y:y + h, x:x + w] = True
            maps[i, y:y + h, x:x + w] += rng.uniform(0.5, 3)
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_metrics_match_the_exact_ones(seed):
    masks, maps = _case(seed)
    stream = StreamingPixelMetrics(float(maps.min()), float(maps.max()))
    for mask, scores in zip(masks, maps):
        stream.add(mask, scores)
    got, exact = stream.metrics(), pixel_metrics(masks, maps)
    for name, tolerance in (("pixel_auroc", 1e-3), ("aupro", 1e-3), ("pixel_f1_max", 3e-3)):
        # F1-max is a maximum over thresholds: binning can only merge the best one with its neighbours
        assert got[name] == pytest.approx(exact[name], abs=tolerance), name
    assert got["unseen_defect_share"] == 0


def test_groups_give_per_type_metrics_with_the_good_images():
    masks, maps = _case(3)
    stream = StreamingPixelMetrics(float(maps.min()), float(maps.max()))
    groups = ["good", "a", "a", "b", "b", "b"]
    for mask, scores, group in zip(masks, maps, groups):
        stream.add(mask, scores, group)
    keep = [0, 3, 4, 5]
    exact = pixel_metrics(masks[keep], maps[keep])
    assert stream.metrics(["good", "b"])["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=1e-3)
    assert stream.metrics()["aupro"] == pytest.approx(pixel_metrics(masks, maps)["aupro"], abs=1e-3)


def test_unseen_pixels_count_as_not_flagged():
    masks, maps = _case(4)
    hidden = maps.copy()
    hidden[:, :, :10] = np.nan  # a band the model never saw
    floor = maps.copy()
    floor[:, :, :10] = maps.min()
    stream = StreamingPixelMetrics(float(maps.min()), float(maps.max()))
    for mask, scores in zip(masks, hidden):
        stream.add(mask, scores)
    got = stream.metrics()
    assert got["pixel_auroc"] == pytest.approx(pixel_metrics(masks, floor)["pixel_auroc"], abs=2e-3)
    assert got["unseen_defect_share"] == pytest.approx(masks[:, :, :10].sum() / masks.sum())


def test_curves_run_from_nothing_flagged_to_everything_flagged():
    masks, maps = _case(5)
    stream = StreamingPixelMetrics(float(maps.min()), float(maps.max()), bins=256)
    for mask, scores in zip(masks, maps):
        stream.add(mask, scores)
    fpr, tpr = stream.curves()["roc"]
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    recall, precision = stream.curves()["pr"]
    assert recall[-1] == 1 and precision[-1] == pytest.approx(masks.mean())
