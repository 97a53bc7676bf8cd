"""Operating points from marked scores: the ROC of results inspectors marked good or defect, and the threshold
that meets a target false-alarm or miss rate on them.

The label rule is the estimator's: defect when `score > threshold`. Between two adjacent distinct marked scores
every threshold gives the same labels, so the ROC has one point per gap (plus "nothing flagged" and
"everything flagged"), and a point's threshold is the middle of its gap: a new part scoring near a marked one
is not decided by which end of the gap was picked. These are counts on the marked set, not rates on the line:
inspectors mark what they were shown (often the doubtful cases), so the set is not a random sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

UPPER_BOUND_LEVEL = 0.95  # one-sided level of the rates' upper bounds


@dataclass(frozen=True)
class OperatingPoint:
    """What `score > threshold` does to the marked set."""

    threshold: float
    false_alarms: int  # marked good, flagged
    detections: int  # marked defect, flagged
    n_good: int
    n_defect: int

    @property
    def misses(self) -> int:
        return self.n_defect - self.detections

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.n_good if self.n_good else float("nan")

    @property
    def detection_rate(self) -> float:
        return self.detections / self.n_defect if self.n_defect else float("nan")

    @property
    def miss_rate(self) -> float:
        return 1.0 - self.detection_rate

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(misses=self.misses, false_alarm_rate=self.false_alarm_rate, detection_rate=self.detection_rate,
                   miss_rate=self.miss_rate, false_alarm_rate_high=rate_upper_bound(self.false_alarms, self.n_good),
                   miss_rate_high=rate_upper_bound(self.misses, self.n_defect))
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}  # NaN -> null


def rate_upper_bound(count: int, n: int, level: float = UPPER_BOUND_LEVEL) -> float:
    """One-sided exact (Clopper-Pearson) upper bound of a rate seen as `count` of `n`: with few marks, "0 of 6
    good flagged" still allows up to 39% (at 95%). Exact rather than Wilson's: it never promises less than
    the level. NaN for n = 0."""
    from scipy.special import betaincinv

    if n == 0:
        return float("nan")
    return 1.0 if count >= n else float(betaincinv(count + 1, n - count, level))


def _checked(scores) -> np.ndarray:
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not np.isfinite(scores).all():
        raise ValueError("marked scores must be finite")
    return scores


def operating_point(good, defect, threshold: float) -> OperatingPoint:
    """Counts of `score > threshold` among marked good and marked defect scores."""
    good, defect = _checked(good), _checked(defect)
    return OperatingPoint(float(threshold), int((good > threshold).sum()), int((defect > threshold).sum()),
                          good.size, defect.size)


def _inside(low: float, high: float) -> float:
    """A threshold in [low, high): the midpoint, or `low` where the gap is too small to split (also in float32,
    the precision scores are compared in)."""
    low, high = float(low), float(high)
    middle = 0.5 * (low + high)
    return middle if low <= middle < high and float(np.float32(middle)) < high else low


def roc_points(good, defect) -> list[OperatingPoint]:
    """(n_good,), (n_defect,) marked scores, each at least one -> every distinct operating point of
    `score > t`, from nothing flagged (t = the highest marked score) to everything flagged (t just below the
    lowest), each with the middle of its gap as threshold. The (false alarm, detection) rates are those of
    sklearn.metrics.roc_curve(drop_intermediate=False)."""
    good, defect = _checked(good), _checked(defect)
    if good.size == 0 or defect.size == 0:
        raise ValueError(f"an ROC needs marked good and marked defect scores, got {good.size} and {defect.size}")
    cuts = np.unique(np.concatenate([good, defect]))  # point j passes cuts[:j] and flags cuts[j:]
    false_alarms = good.size - np.searchsorted(good, cuts, side="right")  # flagged when passing cuts[:j+1]
    detections = defect.size - np.searchsorted(defect, cuts, side="right")
    points = []
    for j in range(cuts.size, -1, -1):  # highest threshold first, as roc_curve
        if j == cuts.size:
            threshold, fa, det = float(cuts[-1]), 0, 0
        elif j == 0:
            threshold, fa, det = float(np.nextafter(np.float32(cuts[0]), np.float32(-np.inf))), good.size, defect.size
        else:
            threshold, fa, det = _inside(cuts[j - 1], cuts[j]), false_alarms[j - 1], detections[j - 1]
        points.append(OperatingPoint(threshold, int(fa), int(det), good.size, defect.size))
    return points


def area_under(points: list[OperatingPoint]) -> float:
    """Trapezoidal area under the ROC points (ties between a good and a defect score count half)."""
    fpr = np.array([p.false_alarm_rate for p in points])
    tpr = np.array([p.detection_rate for p in points])
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def propose(points: list[OperatingPoint], *, false_alarm_rate: float | None = None,
            miss_rate: float | None = None) -> OperatingPoint:
    """The ROC point for one target (give exactly one), as counts on the marked set:

    - false_alarm_rate a: among points flagging at most a * n_good marked good, the most detections (then the
      fewest false alarms);
    - miss_rate b: among points missing at most b * n_defect marked defects, the fewest false alarms (then the
      most detections).

    Both land on the upper-left frontier of the ROC; distinct points never tie on both counts. Always
    possible: nothing flagged meets any false-alarm target, everything flagged any miss target."""
    if (false_alarm_rate is None) == (miss_rate is None):
        raise ValueError("give exactly one target: false_alarm_rate or miss_rate")
    target = false_alarm_rate if miss_rate is None else miss_rate
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"a target rate is in [0, 1], got {target}")
    slack = 1e-9  # 0.1 * 10 marked good is 1 false alarm, not 0.999...
    if false_alarm_rate is not None:
        feasible = [p for p in points if p.false_alarms <= false_alarm_rate * p.n_good + slack]
        return max(feasible, key=lambda p: (p.detections, -p.false_alarms))
    feasible = [p for p in points if p.misses <= miss_rate * p.n_defect + slack]
    return min(feasible, key=lambda p: (p.false_alarms, -p.detections))
