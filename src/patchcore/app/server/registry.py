"""The models a server serves: every *.model file in one folder, loaded once at start-up, by file stem."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError, PatchCoreError
from ...estimator import PatchCore
from ...estimator.ensemble import load_model

log = logging.getLogger("patchcore.server")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class ModelEntry:
    """One served model. `model` is swapped as a whole (reload) or swaps its own state (update); the batcher
    reads `model` once per batch, so a request is scored by one version, never a mix."""

    name: str
    path: Path
    model: PatchCore
    version: int = 1  # +1 on every swap in this process
    file_sha256: str = ""
    loaded_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one update or reload at a time


class ModelRegistry:
    def __init__(self, folder: str | Path, *, device: str = "auto", runtime: str = "torch"):
        self.folder = Path(folder)
        self.device = device
        self.runtime = runtime
        self.entries: dict[str, ModelEntry] = {}
        self.errors: dict[str, str] = {}  # model files that failed to load, and why

    def check_folder(self) -> None:
        """Before the server starts: a folder holding at least one *.model file (a mistyped folder used to be
        created, and served nothing with /healthz 200)."""
        if not self.folder.is_dir():
            raise InputError(f"{self.folder}: not a folder of *.model files (no such folder)")
        if not any(self.folder.glob("*.model")):
            raise InputError(f"{self.folder}: no *.model files in this folder")

    def load_all(self) -> None:
        self.check_folder()
        for path in sorted(self.folder.glob("*.model")):
            name = path.stem
            if not NAME.match(name):
                self.errors[path.name] = "file name is not a usable model name ([A-Za-z0-9_.-])"
                continue
            try:
                model = self.load_model(path)
            except PatchCoreError as err:
                log.error("not serving %s: %s", path, err)
                self.errors[path.name] = str(err)
                continue
            self.entries[name] = ModelEntry(name, path, model, file_sha256=file_digest(path))

    def load_model(self, path: Path) -> PatchCore:
        """One model file (a single model or an ensemble), scored by torch, or (runtime "onnx") through its
        export beside it, MODEL.onnx/ (`patchcore export`); update, reload and thresholds stay the estimator's."""
        if self.runtime == "onnx":
            from ...estimator.exported import ExportedPatchCore

            return ExportedPatchCore.load(path)
        return load_model(path, device=self.device)  # a single model or an ensemble

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name)
