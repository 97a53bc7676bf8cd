"""Thresholds from inspector feedback (issue 19, point 4): the ROC of marked results and the proposals
(core/operating_points.py, against a hand-computed case and sklearn), and the server's ROC and threshold
routes (rescored marks, auth, apply, labels, history across a restart, the kept .prev)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from patchcore.core.operating_points import area_under, operating_point, propose, roc_points

# ---------------------------------------------------------------------------- pure functions
# Hand-computed: marked good 1, 2, 3, 5; marked defect 3, 4, 6. Label: score > t.
GOOD, DEFECT = [1.0, 2.0, 3.0, 5.0], [3.0, 4.0, 6.0]
HAND = [  # (threshold, false alarms, detections), highest threshold first
    (6.0, 0, 0), (5.5, 0, 1), (4.5, 1, 1), (3.5, 1, 2), (2.5, 2, 3), (1.5, 3, 3)]


def test_roc_points_by_hand():
    points = roc_points(GOOD, DEFECT)
    assert [(p.threshold, p.false_alarms, p.detections) for p in points[:-1]] == HAND
    last = points[-1]  # everything flagged: just below the lowest score
    assert last.threshold < 1.0 and (last.false_alarms, last.detections) == (4, 3)
    for p in points:  # each point's threshold gives its counts
        again = operating_point(GOOD, DEFECT, p.threshold)
        assert (again.false_alarms, again.detections) == (p.false_alarms, p.detections)
    # pairs (defect > good) + half the ties: 2.5 + 3 + 4 of 12
    assert area_under(points) == pytest.approx(9.5 / 12)


def test_proposals_by_hand():
    points = roc_points(GOOD, DEFECT)
    # at most 1 of 4 good flagged: the most detections is 2 (t 3.5)
    p = propose(points, false_alarm_rate=0.25)
    assert (p.threshold, p.false_alarms, p.detections) == (3.5, 1, 2)
    assert propose(points, false_alarm_rate=0.0).threshold == 5.5  # no false alarm: 1 detection
    assert propose(points, false_alarm_rate=0.2).threshold == 5.5  # 0.8 of a part is 0 parts
    # every defect caught: the fewest false alarms is 2 (t 2.5)
    p = propose(points, miss_rate=0.0)
    assert (p.threshold, p.false_alarms, p.misses) == (2.5, 2, 0)
    assert propose(points, miss_rate=1 / 3).threshold == 3.5  # one miss allowed (no float slack lost)
    assert propose(points, miss_rate=1.0).threshold == 5.5  # no false alarm; of those, the most detections
    current = operating_point(GOOD, DEFECT, 4.0)
    assert (current.false_alarms, current.misses, current.false_alarm_rate) == (1, 2, 0.25)
    with pytest.raises(ValueError):
        propose(points)
    with pytest.raises(ValueError):
        propose(points, false_alarm_rate=0.1, miss_rate=0.1)
    with pytest.raises(ValueError):
        propose(points, miss_rate=1.5)
    with pytest.raises(ValueError):
        roc_points(GOOD, [])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_points_match_sklearn_and_proposals_are_optimal(seed):
    rng = np.random.default_rng(seed)
    good = np.round(rng.normal(10, 2, 40), 1).astype(np.float32)  # rounded: ties within and across classes
    defect = np.round(rng.normal(13, 3, 25), 1).astype(np.float32)
    points = roc_points(good, defect)
    scores = np.concatenate([good, defect])
    truth = np.r_[np.zeros(good.size), np.ones(defect.size)]
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    ours = {(p.false_alarm_rate, p.detection_rate) for p in points}
    assert ours == {(float(a), float(b)) for a, b in zip(fpr, tpr)}
    assert area_under(points) == pytest.approx(roc_auc_score(truth, scores))
    for p in points:  # thresholds reproduce their counts in the float32 comparison the model makes
        assert int((good > np.float32(p.threshold)).sum()) == p.false_alarms
        assert int((defect > np.float32(p.threshold)).sum()) == p.detections
    for rate in (0.0, 0.05, 0.1, 0.3):
        best = propose(points, false_alarm_rate=rate)
        brute = [operating_point(good, defect, t) for t in np.r_[scores, scores.min() - 1]]
        ok = [q for q in brute if q.false_alarms <= rate * good.size]
        assert best.false_alarms <= rate * good.size
        assert best.detections == max(q.detections for q in ok)
        best = propose(points, miss_rate=rate)
        ok = [q for q in brute if q.misses <= rate * defect.size]
        assert best.misses <= rate * defect.size
        assert best.false_alarms == min(q.false_alarms for q in ok)
