"""Model files on disk across updates: each update writes the new model atomically and keeps the one it
replaces as `<name>.model.<UTC time>.prev` beside it (not `*.model`, so a server never loads it as a model).

Rollback is by file: move a `.prev` file back over the model file (then POST .../reload or restart). When
the model path is a symbolic link, the file replaced (and kept) is the link's target, beside which the
`.prev` file goes: rolling back moves it over the target and the link keeps working.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ...estimator import PatchCore
from ...io.model_file import atomic_write_bytes

PREVIOUS_SUFFIX = ".prev"


def real_model_path(path: str | Path) -> Path:
    """The file an update replaces: `path`, or the file a symbolic link at `path` points to."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def previous_versions(path: str | Path) -> list[Path]:
    """Kept earlier versions of a model file, oldest first."""
    path = real_model_path(path)
    return sorted(path.parent.glob(f"{path.name}.*{PREVIOUS_SUFFIX}"))


def keep_previous(path: str | Path) -> Path | None:
    """Keep the file now at `path` (a link's target) as a new .prev file beside it; None when there is
    none. A hard link where the file system allows, else a copy written atomically (never half a file)."""
    path = real_model_path(path)
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"{path.name}.{stamp}{PREVIOUS_SUFFIX}")
    counter = 1
    while kept.exists():  # two updates in the same second
        kept = path.with_name(f"{path.name}.{stamp}-{counter}{PREVIOUS_SUFFIX}")
        counter += 1
    try:
        os.link(path, kept)
    except OSError:
        atomic_write_bytes(kept, path.read_bytes())
    return kept


def save_keeping_previous(model: PatchCore, path: str | Path) -> Path | None:
    """Write `model` to `path` (a link's target) atomically; an existing file there is kept first as a
    .prev version. At every moment the model path holds a complete model; if the write fails, the .prev
    just made is removed again (the previous file is still in place). Returns the kept file, if any."""
    target = real_model_path(path)
    kept = keep_previous(target)
    try:
        model.save(target)
    except BaseException:
        if kept is not None:
            kept.unlink(missing_ok=True)
        raise
    return kept
