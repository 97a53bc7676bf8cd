"""The review store: inspector feedback on scored images, kept on disk with the image.

SQLite (standard library) in WAL mode, so reads never wait for the writer; images are saved under names
the server chooses (a random hex id and the decoded format's suffix), never the client's file name.
"""
from __future__ import annotations

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
    applied_version INTEGER            -- the model version an update folded it into (NULL: pending)
);
CREATE INDEX IF NOT EXISTS feedback_pending ON feedback (model, verdict, applied_version);
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


class ReviewStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        self.db_path = self.folder / "review.sqlite3"
        self._lock = threading.Lock()  # one writer at a time from this process
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=10.0)
        db.row_factory = sqlite3.Row
        return db

    def add(self, *, model: str, result_id: str, image: bytes, suffix: str, verdict: str, score: float,
            model_version: int, note: str | None = None) -> Feedback:
        name = f"images/{uuid.uuid4().hex}{suffix}"
        path = self.folder / name
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(image)
        tmp.replace(path)
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "INSERT INTO feedback (model, result_id, image_file, verdict, score, model_version, note, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (model, result_id, name, verdict, score, model_version, note, time.time()))
            row_id = cursor.lastrowid
        return Feedback(row_id, model, result_id, path, verdict, score, model_version, None)

    def pending_good(self, model: str) -> list[Feedback]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM feedback WHERE model = ? AND verdict = 'good' AND applied_version "
                              "IS NULL ORDER BY id", (model,)).fetchall()
        return [self._row(r) for r in rows]

    def mark_applied(self, ids: list[int], version: int) -> None:
        with self._lock, self._connect() as db:
            db.executemany("UPDATE feedback SET applied_version = ? WHERE id = ?", [(version, i) for i in ids])

    def counts(self, model: str) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT verdict, applied_version IS NULL AS pending, COUNT(*) FROM feedback "
                              "WHERE model = ? GROUP BY 1, 2", (model,)).fetchall()
        out = {"good_pending": 0, "good_applied": 0, "defect": 0}
        for verdict, pending, count in rows:
            key = "defect" if verdict == "defect" else ("good_pending" if pending else "good_applied")
            out[key] += count
        return out

    def _row(self, row: sqlite3.Row) -> Feedback:
        return Feedback(row["id"], row["model"], row["result_id"], self.folder / row["image_file"], row["verdict"],
                        row["score"], row["model_version"], row["applied_version"])
