"""Killing a child Python process at a chosen point: what a crash or `kill -9` does to a run (issue 16)."""
from __future__ import annotations

import signal
import subprocess
import sys


def sigkill_when_printed(code: str, line: str, *, timeout: float = 30) -> int:
    """Run `code` in a child interpreter, SIGKILL it as soon as it prints `line` (its first line of output,
    asserted), and return its pid once it is gone."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == line
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=timeout)
    finally:
        child.kill()
        child.stdout.close()
    return child.pid
