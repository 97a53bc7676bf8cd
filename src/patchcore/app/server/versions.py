"""Model files on disk across updates: each update writes the new model atomically and keeps the one it
replaces as `<name>.model.<UTC time>.prev` beside it (not `*.model`, so a server never loads it as a model).

Rollback is by file: move a `.prev` file back over `<name>.model` (then POST .../reload or restart).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ...estimator import PatchCore

PREVIOUS_SUFFIX = ".prev"


def previous_versions(path: str | Path) -> list[Path]:
    """Kept earlier versions of a model file, oldest first."""
    path = Path(path)
    return sorted(path.parent.glob(f"{path.name}.*{PREVIOUS_SUFFIX}"))


def save_keeping_previous(model: PatchCore, path: str | Path) -> Path | None:
    """Write `model` to `path` atomically; an existing file there is kept first as a .prev version.

    The previous file is hard-linked (a copy where links are not possible) before the atomic rename
    of the new file, so at every moment `path` holds a complete model. Returns the kept file, if any.
    """
    path = Path(path)
    kept = None
    if path.exists():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = path.with_name(f"{path.name}.{stamp}{PREVIOUS_SUFFIX}")
        counter = 1
        while kept.exists():  # two updates in the same second
            kept = path.with_name(f"{path.name}.{stamp}-{counter}{PREVIOUS_SUFFIX}")
            counter += 1
        try:
            os.link(path, kept)
        except OSError:
            kept.write_bytes(path.read_bytes())
    model.save(path)
    return kept
