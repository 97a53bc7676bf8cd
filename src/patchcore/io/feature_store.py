"""Holding all training patch features without holding them all in RAM.

The coreset is chosen on the d*-dimensional projection, which stays in memory (N x 128 float32).
The full D-dimensional features are only needed afterwards, for the selected rows, so they go to a
temporary file once they exceed a memory budget, and the selected rows are read back in index
order. Both paths return identical bytes for the same rows.

The spill file has no name (O_TMPFILE where the system has it, else created and unlinked at once): it
disappears with the process however that ends, SIGKILL included, so no run leaves a 128 MB file behind
for the next one. Files named by earlier versions (`patchcore-features-*.f32`) that no running process
holds open are removed at the next spill.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class FeatureStore:
    """Append (n, D) float32 rows; `gather(indices)` returns the chosen rows as one tensor."""

    def __init__(self, dim: int, *, max_memory_bytes: int, spill_dir: str | Path | None = None):
        self.dim = dim
        self.max_memory_bytes = max_memory_bytes
        self.spill_dir = spill_dir
        self.rows = 0
        self._chunks: list[np.ndarray] = []
        self._file = None  # an unnamed TemporaryFile once spilled

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def append(self, rows: torch.Tensor) -> None:
        array = rows.detach().to("cpu", torch.float32).contiguous().numpy()
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) rows, got {array.shape}")
        if self._file is None and (self.rows + array.shape[0]) * self.dim * 4 > self.max_memory_bytes:
            self._spill()
        if self._file is None:
            self._chunks.append(array.copy())
        else:
            self._file.write(memoryview(array).cast("B"))  # through the buffer: no copy of the rows
        self.rows += array.shape[0]

    def _spill(self) -> None:
        remove_stale_spill_files(self.spill_dir)
        self._file = tempfile.TemporaryFile(prefix="patchcore-features-", suffix=".f32", dir=self.spill_dir)
        for chunk in self._chunks:
            self._file.write(memoryview(chunk).cast("B"))
        self._chunks = []

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at `indices` (any order) -> (len(indices), D) float32."""
        index = indices.cpu().numpy()
        if index.size and (index.min() < 0 or index.max() >= self.rows):
            raise IndexError("feature index out of range")
        out = np.empty((index.size, self.dim), dtype=np.float32)
        if self._file is None:
            start = 0
            for chunk in self._chunks:
                inside = (index >= start) & (index < start + chunk.shape[0])
                out[inside] = chunk[index[inside] - start]
                start += chunk.shape[0]
        else:
            # Plain reads, not a memory map: pages of a mapped file count in the process's resident
            # memory (the kernel may map up to 64 kB around each touched row); read() copies only the row.
            self._file.flush()
            row_bytes = self.dim * 4
            for position in np.argsort(index, kind="stable"):  # front to back through the file
                self._file.seek(int(index[position]) * row_bytes)
                if self._file.readinto(memoryview(out[position]).cast("B")) != row_bytes:
                    raise OSError("the temporary feature file is shorter than expected")
            self._file.seek(0, 2)  # back to the end, for further appends
        return torch.from_numpy(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # deletes the temporary file
            self._file = None
        self._chunks = []

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_stale_spill_files(folder: str | Path | None = None) -> list[Path]:
    """Remove this user's `patchcore-features-*.f32` files (named spill files of earlier versions, left by a
    killed fit) in `folder` (default: the temporary folder) that no running process has open (Linux /proc;
    elsewhere nothing is removed). Returns what was removed."""
    folder = Path(folder or tempfile.gettempdir())
    candidates = list(folder.glob("patchcore-features-*.f32"))
    if not candidates or not Path("/proc/self/fd").is_dir():
        return []
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for link in fd_dir.iterdir():
                try:
                    held.add(os.readlink(link))
                except OSError:
                    pass
        except OSError:  # another user's process, or one that just ended
            pass
    removed = []
    for path in candidates:
        try:
            mine = path.stat().st_uid == os.getuid()  # only this user's: their processes' fds are readable
        except OSError:
            continue
        if mine and str(path.resolve()) not in held:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
