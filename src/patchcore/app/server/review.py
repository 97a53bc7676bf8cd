"""The review store: inspector feedback on scored images, kept on disk with the image.

SQLite (standard library) in WAL mode, so reads never wait for the writer; images are saved under names
the server chooses (a random hex id and the decoded format's suffix), never the client's file name.
"""
from __future__ import annotations

import math
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    result_id TEXT NOT NULL,
    image_file TEXT NOT NULL,          -- relative to the store's folder, server-chosen
    verdict TEXT NOT NULL CHECK (verdict IN ('good', 'defect')),
    score REAL NOT NULL,               -- the score when the inspector saw it
    model_version INTEGER NOT NULL,    -- the served version that gave that score
    note TEXT,
    created REAL NOT NULL,
    applied_version INTEGER,           -- the model version an update folded it into (NULL: pending)
    left_out TEXT                      -- why an update could not take this image (NULL: it could, or not tried)
);
CREATE INDEX IF NOT EXISTS feedback_pending ON feedback (model, verdict, applied_version);
CREATE TABLE IF NOT EXISTS threshold_changes (  -- image thresholds set from feedback (POST .../threshold)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    created REAL NOT NULL,
    old REAL,                          -- the image threshold before (NULL: the model had none)
    new REAL NOT NULL,
    rule TEXT NOT NULL,                -- 'threshold' (a value given), 'false_alarm_rate' or 'miss_rate'
    target REAL,                       -- the target rate of the rule (NULL for a value given)
    n_good INTEGER NOT NULL,           -- marked results the decision saw
    n_defect INTEGER NOT NULL,
    false_alarms INTEGER,              -- what the new threshold gives on them (NULL without marks)
    misses INTEGER,
    model_version INTEGER NOT NULL,    -- the version served with the new threshold (counted in that process)
    file_sha256 TEXT NOT NULL,         -- the model file written with it
    previous_file TEXT                 -- the file it replaced, kept as MODEL.<UTC>.prev
);
CREATE INDEX IF NOT EXISTS threshold_changes_model ON threshold_changes (model, id);
"""


@dataclass(frozen=True)
class Feedback:
    id: int
    model: str
    result_id: str
    image_path: Path
    verdict: str
    score: float
    model_version: int
    applied_version: int | None
    left_out: str | None = None
    note: str | None = None
    created: float = 0.0

    def to_dict(self, folder: Path) -> dict:
        return {"feedback_id": self.id, "result_id": self.result_id, "verdict": self.verdict, "score": self.score,
                "model_version": self.model_version, "note": self.note, "created": self.created,
                "status": ("left_out" if self.left_out is not None else "pending" if self.applied_version is None
                           else "applied"),
                "applied_version": self.applied_version, "left_out": self.left_out,
                "image": self.image_path.relative_to(folder).as_posix()}


class AlreadyApplied(Exception):
    """Feedback an update has folded into the model cannot be withdrawn (roll the model back by file)."""


class ReviewStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        self.db_path = self.folder / "review.sqlite3"
        self._lock = threading.Lock()  # one writer at a time from this process
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
            if "left_out" not in columns:  # a store made before feedback could be left out of an update
                db.execute("ALTER TABLE feedback ADD COLUMN left_out TEXT")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=10.0)
        db.row_factory = sqlite3.Row
        return db

    def add(self, *, model: str, result_id: str, image: bytes, suffix: str, verdict: str, score: float,
            model_version: int, note: str | None = None) -> Feedback:
        name = f"images/{uuid.uuid4().hex}{suffix}"
        path = self.folder / name
        if not math.isfinite(score):
            raise ValueError(f"feedback on a result without a finite score ({score})")
        tmp = path.with_name("." + path.name + ".tmp")
        created = time.time()
        try:
            tmp.write_bytes(image)
            tmp.replace(path)
            with self._lock, self._connect() as db:
                cursor = db.execute(
                    "INSERT INTO feedback (model, result_id, image_file, verdict, score, model_version, note, "
                    "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (model, result_id, name, verdict, score, model_version, note, created))
                row_id = cursor.lastrowid
        except BaseException:  # no image without its row
            tmp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise
        return Feedback(row_id, model, result_id, path, verdict, score, model_version, None, None, note, created)

    def pending_good(self, model: str) -> list[Feedback]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM feedback WHERE model = ? AND verdict = 'good' AND applied_version "
                              "IS NULL AND left_out IS NULL ORDER BY id", (model,)).fetchall()
        return [self._row(r) for r in rows]

    def list_feedback(self, model: str, *, limit: int = 1000) -> list[Feedback]:
        """The model's feedback, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM feedback WHERE model = ? ORDER BY id DESC LIMIT ?",
                              (model, limit)).fetchall()
        return [self._row(r) for r in rows]

    def marked(self, model: str, *, limit: int) -> tuple[list[Feedback], int]:
        """Marks an ROC may use, newest first, at most `limit`: every defect mark and the good marks no update
        folded into the bank (those are training images now, their scores in-sample); and how many more there are."""
        where = "model = ? AND (verdict = 'defect' OR applied_version IS NULL)"
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM feedback WHERE {where} ORDER BY id DESC LIMIT ?",
                              (model, limit)).fetchall()
            total = db.execute(f"SELECT COUNT(*) FROM feedback WHERE {where}", (model,)).fetchone()[0]
        return [self._row(r) for r in rows], total - len(rows)

    def add_threshold_change(self, *, model: str, old: float | None, new: float, rule: str, target: float | None,
                             n_good: int, n_defect: int, false_alarms: int | None, misses: int | None,
                             model_version: int, file_sha256: str, previous_file: str | None) -> dict:
        created = time.time()
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "INSERT INTO threshold_changes (model, created, old, new, rule, target, n_good, n_defect, "
                "false_alarms, misses, model_version, file_sha256, previous_file) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, created, old, new, rule, target, n_good, n_defect, false_alarms, misses, model_version,
                 file_sha256, previous_file))
            row = db.execute("SELECT * FROM threshold_changes WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return dict(row)

    def threshold_history(self, model: str, *, limit: int = 50) -> list[dict]:
        """The model's threshold changes, newest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM threshold_changes WHERE model = ? ORDER BY id DESC LIMIT ?",
                              (model, limit)).fetchall()
        return [dict(r) for r in rows]

    def withdraw(self, model: str, feedback_id: int) -> Feedback | None:
        """Remove feedback that no update has used, with its image; None if there is none by that id.
        AlreadyApplied if an update folded it into the model."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT * FROM feedback WHERE model = ? AND id = ?", (model, feedback_id)).fetchone()
            if row is None:
                return None
            item = self._row(row)
            if item.applied_version is not None:
                raise AlreadyApplied(f"feedback {feedback_id} is part of model version {item.applied_version}; "
                                     f"roll the model back by file to undo it")
            db.execute("DELETE FROM feedback WHERE id = ?", (feedback_id,))
        item.image_path.unlink(missing_ok=True)
        return item

    def mark_left_out(self, reasons: dict[int, str]) -> None:
        with self._lock, self._connect() as db:
            db.executemany("UPDATE feedback SET left_out = ? WHERE id = ?", [(r, i) for i, r in reasons.items()])

    def mark_applied(self, ids: list[int], version: int) -> None:
        with self._lock, self._connect() as db:
            db.executemany("UPDATE feedback SET applied_version = ? WHERE id = ?", [(version, i) for i in ids])

    def counts(self, model: str) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT verdict, applied_version IS NULL AS pending, COUNT(*) FROM feedback "
                              "WHERE model = ? GROUP BY 1, 2", (model,)).fetchall()
        out = {"good_pending": 0, "good_applied": 0, "defect": 0, "left_out": 0}
        for verdict, pending, count in rows:
            key = "defect" if verdict == "defect" else ("good_pending" if pending else "good_applied")
            out[key] += count
        with self._connect() as db:
            left = db.execute("SELECT COUNT(*) FROM feedback WHERE model = ? AND left_out IS NOT NULL",
                              (model,)).fetchone()[0]
        out["left_out"] = left
        out["good_pending"] -= left  # left-out images are good feedback no update took
        return out

    def _row(self, row: sqlite3.Row) -> Feedback:
        return Feedback(row["id"], row["model"], row["result_id"], self.folder / row["image_file"], row["verdict"],
                        row["score"], row["model_version"], row["applied_version"], row["left_out"], row["note"],
                        row["created"])
