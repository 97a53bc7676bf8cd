"""Child Python processes for tests: killed at a chosen point (what a crash or `kill -9` does to a run, issue 16),
or run where torch cannot be imported (the torch-free runtime and its Ray actors, issues 17 and 18)."""
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


# The first lines of a child script that must run without torch: `import torch` (or torchvision, timm) fails.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
"""
