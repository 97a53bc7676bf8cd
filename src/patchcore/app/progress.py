"""Progress bars for the command line (tqdm on stderr when it is a terminal)."""
from __future__ import annotations

import sys

from ..evaluation.progress import Progress, no_progress


def progress_bars(quiet: bool) -> Progress:
    """progress(total, description) -> a tqdm bar, or a silent one when quiet."""
    if quiet:
        return no_progress

    def bar(total: int, description: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=None)  # None: off if no TTY

    return bar
