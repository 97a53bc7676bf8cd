"""The progress protocol library code reports through; applications pass a real bar (tqdm), tests nothing."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...


# progress(total, description) -> a context manager giving a ProgressBar
Progress = Callable[[int, str], AbstractContextManager[ProgressBar]]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> bool:
        return False


def no_progress(total: int, description: str) -> _Silent:
    return _Silent()
