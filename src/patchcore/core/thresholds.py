"""Decision thresholds from nominal scores (never from test images): a threshold that means a false-alarm rate.

PatchCore gives scores, not decisions (PATCHCORE.md section 5). With no defects to learn from, a threshold can
only come from out-of-sample nominal scores, and it should mean something a line can plan with: "about 1% of
good parts will be flagged". The estimator below gives the (1 - rate) quantile of nominal scores:

- A log-normal through two robust points of the upper half: mu = median(log s), sigma = (q95(log s) - mu) /
  z_0.95, threshold = exp(mu + z_(1-rate) sigma). Why not the empirical k-th largest score: at 1% and ~200
  images it is the 2nd largest score, decided by the very images most likely to be "good" parts that are not
  quite good (real good sets hold a few). Why not the MAD for sigma: it describes the middle half, and nominal
  scores have a heavier upper tail than a log-normal through their middle (measured on bottle, 209
  out-of-sample scores, Lite0: a MAD-based 1% threshold was exceeded by 6.7% of them, the q95-based one by
  1.9%; on varied crops of bottle 7.7% vs 1.0%). The 95th percentile moves little when a few percent of the
  set are bad parts. Why log: image scores are positive maxima of distances, right-skewed. The price is a
  parametric tail beyond q95: `evaluate` reports the observed rate on new parts beside the target.
- Its uncertainty with n images: a seeded bootstrap of the estimator, read as the false-alarm rate each
  resampled threshold would give under the fitted distribution (a 90% interval).

Where the nominal scores come from is fit's business (estimator/model.py): every training image scored against
the bank without the rows of its fold, or a held-out share (calibration_split, calibration_ratio > 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
UPPER_QUANTILE = 0.95  # the second point the log-normal goes through (the median is the first)
ROBUST_UPPER_QUANTILE = 0.75  # the same for a cut that a quarter of bad scores cannot move
BOOTSTRAP_ROUNDS = 400


@dataclass(frozen=True)
class FalseAlarmEstimate:
    """What a threshold means on nominal parts: the expected share flagged, and a 90% interval."""

    rate: float
    low: float
    high: float
    n: int

    def text(self) -> str:
        return (f"{percent(self.rate)} expected false alarms (90% interval {percent(self.low)} to "
                f"{percent(self.high)}, from {self.n} out-of-sample good images)")


def percent(share: float) -> str:
    """0.0123 -> '1.2%'; below 0.1% as '<0.1%' (a bootstrap tail says nothing finer)."""
    return "<0.1%" if share < 0.001 else f"{100 * share:.2g}%" if share < 0.1 else f"{100 * share:.0f}%"


def _log_location_scale(scores, upper_quantile: float = 0.95) -> tuple[float, float]:
    """(mu, sigma) of the log-normal through the median and the `upper_quantile` of the scores."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    mu, upper = (float(v) for v in np.quantile(logs, [0.5, upper_quantile]))
    sigma = (upper - mu) / NormalDist().inv_cdf(upper_quantile)
    if sigma <= 0:  # the upper half is one value: fall back to the MAD, then the plain standard deviation
        sigma = MAD_TO_SIGMA * float(np.median(np.abs(logs - mu))) or float(np.std(logs))
    return mu, max(sigma, 1e-9)


def quantile_threshold(scores, false_alarm_rate: float, *, upper_quantile: float = UPPER_QUANTILE) -> float:
    """The (1 - false_alarm_rate) quantile of nominal scores (> 0): the log-normal through their median and
    95th percentile. `upper_quantile` 0.75 gives a cut that up to a quarter of bad scores cannot move (fit's
    exclude_outliers uses it to find defect-like patches in a set that may be that dirty)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"need nominal scores and a rate in (0, 1), got {scores.size} scores, {false_alarm_rate}")
    mu, sigma = _log_location_scale(scores, upper_quantile)
    return float(math.exp(mu + NormalDist().inv_cdf(1.0 - false_alarm_rate) * sigma))


def expected_false_alarms(scores, threshold: float, *, seed: int = 0) -> FalseAlarmEstimate:
    """The share of nominal parts above `threshold` under the distribution fitted to `scores`, with a 90%
    bootstrap interval (the estimator refitted on resampled scores). Works for any threshold: one fit set, one
    the user gave, one an old model file holds."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < 2:
        raise ValueError("need at least two nominal scores")

    def rate(sample) -> float:
        mu, sigma = _log_location_scale(sample)
        return 1.0 - NormalDist(mu, sigma).cdf(math.log(max(threshold, 1e-12)))

    rng = np.random.default_rng(seed)
    rounds = [rate(scores[rng.integers(0, scores.size, scores.size)]) for _ in range(BOOTSTRAP_ROUNDS)]
    low, high = np.quantile(rounds, [0.05, 0.95])
    return FalseAlarmEstimate(rate(scores), float(low), float(high), int(scores.size))


def fold_of_images(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) fold id of each training image: a seeded permutation dealt into `folds` folds of equal size."""
    order = np.random.default_rng(seed + 1).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def calibration_split(items: list, ratio: float, seed: int) -> tuple[list, list]:
    """(bank items, held-out items): round(ratio * n) items held out (seeded), at least min(5, n // 4)
    since a threshold from two or three scores is mostly noise; none if ratio is 0 or n < 10."""
    import torch

    count = max(int(round(ratio * len(items))), min(5, len(items) // 4))
    if ratio <= 0 or len(items) < 10:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    held_out = set(order[:count])
    return ([im for i, im in enumerate(items) if i not in held_out],
            [im for i, im in enumerate(items) if i in held_out])
