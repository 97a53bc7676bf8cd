"""Thresholds from inspector feedback: the marked results scored by the served model, their ROC and the proposed
threshold for a target (core/operating_points.py), and applying a threshold as a new model version.

Score source: every mark the ROC uses is scored again by the model being served now, never taken from the
feedback row. The row's score came from whichever bank was served when the inspector looked, and an update
since (or a reload after `patchcore update`) changed the bank; mixing those scores with today's would put
points of different models on one curve, and the threshold applies to today's scores. Rescoring is bounded
(the newest MAX_MARKS marks) and cached per model file (sha256): a file changes, everything is scored again;
only the threshold changes, the scores are kept. Good marks an update folded into the bank are left out: they
are training images of the current model, scored in-sample.

The caller holds the model's lock (routes do), so the model cannot change while its marks are scored.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ...core.operating_points import area_under, operating_point, propose, roc_points
from ...errors import PatchCoreError
from .registry import ModelEntry, file_digest
from .review import Feedback, ReviewStore
from .versions import real_model_path, save_keeping_previous

MAX_MARKS = 500  # newest marks scored for an ROC (~25 s of Lite0 on 2 CPU cores when none is cached)
RESCORE_CHUNK = 8  # images per predict call


class NotEnoughMarks(Exception):
    """A proposal needs marked good and marked defect results."""


@dataclass
class MarkedScores:
    """The marks an ROC uses, scored by the served model (file `file_sha256`)."""

    file_sha256: str
    scored: list[tuple[Feedback, float]]  # newest first
    beyond_limit: int = 0  # older marks past MAX_MARKS
    unscorable: dict[int, str] = field(default_factory=dict)  # feedback id -> why it could not be scored

    @property
    def good(self) -> np.ndarray:
        return np.array([s for f, s in self.scored if f.verdict == "good"], dtype=np.float64)

    @property
    def defect(self) -> np.ndarray:
        return np.array([s for f, s in self.scored if f.verdict == "defect"], dtype=np.float64)

    @property
    def complete(self) -> bool:
        return self.good.size > 0 and self.defect.size > 0


class ScoreCache:
    """Rescored marks, per model name: (file sha256, {feedback id: score, or the reason it has none})."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_model: dict[str, tuple[str, dict[int, float | str]]] = {}

    def for_file(self, name: str, sha: str) -> dict[int, float | str]:
        with self._lock:
            cached = self._by_model.get(name)
            if cached is None or cached[0] != sha:  # another file: nothing cached holds
                cached = self._by_model[name] = (sha, {})
            return cached[1]

    def carry(self, name: str, old_sha: str, new_sha: str) -> None:
        """A new file that differs only in its thresholds scores alike: keep its scores."""
        with self._lock:
            cached = self._by_model.get(name)
            if cached is not None and cached[0] == old_sha:
                self._by_model[name] = (new_sha, cached[1])


def marked_scores(entry: ModelEntry, review: ReviewStore, cache: ScoreCache, *, limit: int = MAX_MARKS
                  ) -> MarkedScores:
    """Worker thread, model lock held: the newest `limit` usable marks, scored by the served model."""
    rows, beyond = review.marked(entry.name, limit=limit)
    known = cache.for_file(entry.name, entry.file_sha256)
    todo = [f for f in rows if f.id not in known]
    for start in range(0, len(todo), RESCORE_CHUNK):
        chunk = todo[start:start + RESCORE_CHUNK]
        try:
            scores = [float(s) for s in entry.model.predict([f.image_path for f in chunk]).scores]
        except (PatchCoreError, OSError, ValueError):  # one bad image: score the chunk one by one
            scores = []
            for f in chunk:
                try:
                    scores.append(float(entry.model.predict([f.image_path]).scores[0]))
                except (PatchCoreError, OSError, ValueError) as err:
                    scores.append(f"{f.image_path.name}: {err}".replace(str(f.image_path), f.image_path.name))
        for f, score in zip(chunk, scores):
            known[f.id] = score if isinstance(score, str) or math.isfinite(score) else f"score {score}"
    scored = [(f, known[f.id]) for f in rows if not isinstance(known[f.id], str)]
    unscorable = {f.id: known[f.id] for f in rows if isinstance(known[f.id], str)}
    return MarkedScores(entry.file_sha256, scored, beyond, unscorable)


def review_report(entry: ModelEntry, marked: MarkedScores, *, false_alarm_rate: float | None = None,
                  miss_rate: float | None = None) -> dict:
    """The ROC of the marks, what the current threshold does to them, and the proposal for a target if given."""
    threshold = entry.model.image_threshold_
    body = {"model": entry.name, "model_version": entry.version, "file_sha256": marked.file_sha256,
            "threshold": threshold, "score_source": "marks scored again by the served model file",
            "marked": {"good": int(marked.good.size), "defect": int(marked.defect.size)},
            "not_used": {"beyond_limit": marked.beyond_limit, "limit": MAX_MARKS,
                         "unscorable": [{"feedback_id": i, "reason": r} for i, r in marked.unscorable.items()]},
            "roc": None, "auc": None, "current": None, "proposal": None, "reason": None,
            "marks": [{"feedback_id": f.id, "verdict": f.verdict, "score": score, "score_when_marked": f.score,
                       "model_version_when_marked": f.model_version} for f, score in marked.scored]}
    if threshold is not None and (marked.good.size or marked.defect.size):
        body["current"] = operating_point(marked.good, marked.defect, threshold).to_dict()
    if not marked.complete:
        body["reason"] = (f"an ROC needs marked good and marked defect results; there are {marked.good.size} good "
                          f"and {marked.defect.size} defect (good marks an update used are not counted)")
        return body
    points = roc_points(marked.good, marked.defect)
    body.update(roc=[p.to_dict() for p in points], auc=area_under(points))
    if false_alarm_rate is not None or miss_rate is not None:
        point = propose(points, false_alarm_rate=false_alarm_rate, miss_rate=miss_rate)
        body["proposal"] = {"rule": "false_alarm_rate" if miss_rate is None else "miss_rate",
                            "target": false_alarm_rate if miss_rate is None else miss_rate, **point.to_dict()}
    return body


def apply_threshold(entry: ModelEntry, review: ReviewStore, marked: MarkedScores, *, threshold: float | None = None,
                    false_alarm_rate: float | None = None, miss_rate: float | None = None) -> dict:
    """Worker thread, model lock held: set the image threshold (a value, or the proposal for one target), write
    the model file atomically keeping the previous one, and record the change in the review store. The caller
    bumps the version. On a failed write or record the old state and the old file go back."""
    if threshold is not None:
        rule, target, new = "threshold", None, float(threshold)
    else:
        if not marked.complete:
            raise NotEnoughMarks(f"a proposal needs marked good and marked defect results; there are "
                                 f"{marked.good.size} good and {marked.defect.size} defect")
        rule = "false_alarm_rate" if miss_rate is None else "miss_rate"
        target = false_alarm_rate if miss_rate is None else miss_rate
        new = propose(roc_points(marked.good, marked.defect), false_alarm_rate=false_alarm_rate,
                      miss_rate=miss_rate).threshold
    model = entry.model
    old = model.image_threshold_
    at_new = operating_point(marked.good, marked.defect, new)
    outcome = {"old": old, "new": new, "rule": rule, "target": target, **{
        k: at_new.to_dict()[k] for k in ("n_good", "n_defect", "false_alarms", "misses")}}
    if old is not None and old == new:  # nothing to write: the file and the version stay
        return {**outcome, "changed": False}
    previous = model.state_
    model.with_thresholds(image=new)  # InputError (non-finite) before anything changed
    try:
        kept = save_keeping_previous(model, entry.path)
    except BaseException:
        model.set_state(previous)
        raise
    digest = file_digest(real_model_path(entry.path))
    try:
        row = review.add_threshold_change(
            model=entry.name, old=old, new=new, rule=rule, target=target, n_good=at_new.n_good,
            n_defect=at_new.n_defect, false_alarms=at_new.false_alarms if at_new.n_good else None,
            misses=at_new.misses if at_new.n_defect else None, model_version=entry.version + 1, file_sha256=digest,
            previous_file=None if kept is None else kept.name)
    except BaseException:  # no unrecorded change: the previous file and state go back
        if kept is not None:
            os.replace(kept, real_model_path(entry.path))
        model.set_state(previous)
        raise
    return {**outcome, "changed": True, "file_sha256": digest, "previous_file": row["previous_file"],
            "change": row}
