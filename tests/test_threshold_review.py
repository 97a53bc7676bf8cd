"""Thresholds from inspector feedback (issue 19, point 4): the ROC of marked results and the proposals
(core/operating_points.py, against a hand-computed case and sklearn), and the server's ROC and threshold
routes (rescored marks, auth, apply, labels, history across a restart, the kept .prev)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from patchcore.core.operating_points import area_under, operating_point, propose, rate_upper_bound, roc_points

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


def test_rate_upper_bounds():
    assert rate_upper_bound(0, 6) == pytest.approx(1 - 0.05 ** (1 / 6))  # 0.393: P(0 of 6) = (1 - p)^6 = 5%
    assert rate_upper_bound(6, 6) == 1.0 and np.isnan(rate_upper_bound(0, 0))
    for count, n in ((1, 10), (3, 40), (10, 50)):  # P(at most `count` of n | p = bound) = 5%
        bound = rate_upper_bound(count, n)
        assert count / n < bound < 1
        assert binom_cdf(count, n, bound) == pytest.approx(0.05, abs=1e-9)
    d = operating_point(GOOD, DEFECT, 4.0).to_dict()
    assert d["false_alarm_rate_high"] == pytest.approx(rate_upper_bound(1, 4))
    assert d["miss_rate_high"] == pytest.approx(rate_upper_bound(2, 3))


def binom_cdf(k: int, n: int, p: float) -> float:
    from math import comb

    return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


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


# ---------------------------------------------------------------------------- the server
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_server import AUTH, make_settings, predict, variant_images  # noqa: E402

from patchcore import PatchCore  # noqa: E402
from patchcore.app.server.api import create_app  # noqa: E402


def mark(client, data: bytes, verdict: str) -> dict:
    scored = predict(client, data).json()
    r = client.post("/v1/models/fabric/feedback", json={"result_id": scored["result_id"], "verdict": verdict},
                    headers=AUTH)
    assert r.status_code == 201, r.text
    return scored


def test_roc_of_marks_proposal_apply_and_history_across_a_restart(models_dir, fitted, category):
    goods = [p.read_bytes() for p in sorted((category / "test" / "good").glob("*.png"))[:4]]
    defects = [sorted((category / "test" / kind).glob("*.png"))[0].read_bytes() for kind in ("hole", "stain")]
    novel = variant_images(2)  # good parts of a new colour: false alarms at the fitted threshold
    with TestClient(create_app(make_settings(models_dir))) as c:
        empty = c.get("/v1/models/fabric/roc").json()
        assert empty["roc"] is None and "marked good and marked defect" in empty["reason"]
        good_scores = [mark(c, d, "good")["score"] for d in goods + novel]
        defect_scores = [mark(c, d, "defect")["score"] for d in defects]
        assert max(good_scores) > fitted.image_threshold_  # the new colour is flagged

        body = c.get("/v1/models/fabric/roc", params={"false_alarm_rate": 0.0}).json()
        assert body["marked"] == {"good": 6, "defect": 2} and body["not_used"]["unscorable"] == []
        for m in body["marks"]:  # scored again by the same model file: the scores the inspector saw
            assert m["score"] == pytest.approx(m["score_when_marked"], rel=1e-5)
        points = roc_points(good_scores, defect_scores)
        assert [p["false_alarms"] for p in body["roc"]] == [p.false_alarms for p in points]
        assert body["auc"] == pytest.approx(area_under(points))
        expected = propose(points, false_alarm_rate=0.0)
        assert body["proposal"]["rule"] == "false_alarm_rate" and body["proposal"]["false_alarms"] == 0
        assert body["proposal"]["threshold"] == pytest.approx(expected.threshold, rel=1e-5)
        current = operating_point(good_scores, defect_scores, fitted.image_threshold_)
        assert body["current"]["false_alarms"] == current.false_alarms >= 1
        assert body["current"]["false_alarm_rate_high"] == pytest.approx(rate_upper_bound(current.false_alarms, 6))
        miss = c.get("/v1/models/fabric/roc", params={"miss_rate": 0.0}).json()["proposal"]
        assert miss["rule"] == "miss_rate" and miss["misses"] == 0
        assert c.get("/v1/models/fabric/roc", params={"miss_rate": 0.1, "false_alarm_rate": 0.1}).status_code == 422
        assert c.get("/v1/models/fabric/roc", params={"miss_rate": 2}).status_code == 422

        url = "/v1/models/fabric/threshold"
        missing = c.post(url, json={"false_alarm_rate": 0.0})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert c.post(url, json={"false_alarm_rate": 0.0},
                      headers={"Authorization": "Bearer wrong-token-000000000"}).status_code == 403
        assert c.post(url, json={}, headers=AUTH).status_code == 422
        assert c.post(url, json={"threshold": 1.0, "miss_rate": 0.1}, headers=AUTH).status_code == 422
        assert c.post(url, json={"false_alarm_rate": 1.5}, headers=AUTH).status_code == 422
        for raw in (b'{"threshold": NaN}', b'{"threshold": Infinity}', b'{"miss_rate": NaN, "threshold": 1}'):
            r = c.post(url, content=raw, headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code == 422, raw  # not a 500 from writing the NaN back
        assert c.get("/v1/models/fabric").json()["version"] == 1  # nothing refused changed anything

        applied = c.post(url, json={"false_alarm_rate": 0.0}, headers=AUTH)
        assert applied.status_code == 200, applied.text
        applied = applied.json()
        new = applied["new"]
        assert applied["changed"] and applied["model_version"] == 2 and applied["rule"] == "false_alarm_rate"
        assert applied["old"] == pytest.approx(fitted.image_threshold_) and applied["false_alarms"] == 0
        assert (models_dir / applied["previous_file"]).is_file()
        assert PatchCore.load(models_dir / applied["previous_file"]).image_threshold_ == pytest.approx(applied["old"])
        assert PatchCore.load(models_dir / "fabric.model").image_threshold_ == pytest.approx(new)
        again = predict(c, novel[0]).json()  # the next predict is labelled by the new threshold
        assert again["model_version"] == 2 and again["threshold"] == pytest.approx(new) and again["label"] == "good"

        same = c.post(url, json={"threshold": new}, headers=AUTH).json()  # no change: same file, same version
        assert same["changed"] is False and same["model_version"] == 2
        back = c.post(url, json={"threshold": applied["old"]}, headers=AUTH).json()
        assert back["changed"] and back["model_version"] == 3 and back["rule"] == "threshold"
        assert predict(c, novel[0]).json()["label"] == "defect"
        c.post(url, json={"threshold": new}, headers=AUTH)

    with TestClient(create_app(make_settings(models_dir))) as c:  # a restart on the same folders
        info = c.get("/v1/models/fabric").json()
        assert info["threshold"] == pytest.approx(new)  # the file holds it
        history = info["threshold_history"]
        assert [h["rule"] for h in history] == ["threshold", "threshold", "false_alarm_rate"]  # newest first
        first = history[-1]
        assert first["old"] == pytest.approx(fitted.image_threshold_) and first["new"] == pytest.approx(new)
        assert (first["target"], first["n_good"], first["n_defect"], first["false_alarms"]) == (0.0, 6, 2, 0)
        assert first["model_version"] == 2 and first["previous_file"] == applied["previous_file"]
        assert len(info["previous_versions"]) == 3
        assert predict(c, novel[0]).json()["label"] == "good"


def test_a_failed_save_or_record_leaves_the_model_and_its_file_as_they_were(models_dir, fitted, category, monkeypatch):
    import sqlite3

    from patchcore.app.server import threshold_review

    before = (models_dir / "fabric.model").read_bytes()
    with TestClient(create_app(make_settings(models_dir))) as c:
        mark(c, sorted((category / "test" / "good").glob("*.png"))[0].read_bytes(), "good")
        # a proposal needs both kinds of marks
        assert c.post("/v1/models/fabric/threshold", json={"miss_rate": 0.1}, headers=AUTH).status_code == 409

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(threshold_review, "save_keeping_previous", full_disk)
        r = c.post("/v1/models/fabric/threshold", json={"threshold": 1.0}, headers=AUTH)
        assert r.status_code == 503 and "No space left" in r.json()["detail"]
        monkeypatch.undo()
        store = c.app.state.services.review

        def locked(**kwargs):
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(store, "add_threshold_change", locked)
        r = c.post("/v1/models/fabric/threshold", json={"threshold": 1.0}, headers=AUTH)
        assert r.status_code == 503 and "locked" in r.json()["detail"]
        info = c.get("/v1/models/fabric").json()
        assert info["version"] == 1 and info["threshold"] == pytest.approx(fitted.image_threshold_)
        assert info["threshold_history"] == [] and info["previous_versions"] == []
    assert (models_dir / "fabric.model").read_bytes() == before  # the previous file went back


def test_after_an_update_the_marks_are_scored_by_the_new_bank(models_dir, category):
    defect = sorted((category / "test" / "hole").glob("*.png"))[0].read_bytes()
    novel = variant_images(3, seed=5)
    with TestClient(create_app(make_settings(models_dir))) as c:
        mark(c, novel[0], "good")
        was = mark(c, defect, "defect")["score"]
        assert c.post("/v1/models/fabric/apply-update", headers=AUTH).status_code == 200
        body = c.get("/v1/models/fabric/roc").json()
        # the applied good mark is a training image now: not on the curve
        assert body["marked"] == {"good": 0, "defect": 1} and body["model_version"] == 2
        now = predict(c, defect).json()["score"]
        assert body["marks"][0]["score"] == pytest.approx(now, rel=1e-5)
        assert body["marks"][0]["score_when_marked"] == pytest.approx(was) and body["marks"][0][
            "model_version_when_marked"] == 1
        mark(c, novel[1], "good")
        assert c.get("/v1/models/fabric/roc").json()["marked"] == {"good": 1, "defect": 1}
