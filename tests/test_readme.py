"""The README's promises: its API snippet runs as written, and the module map (docs/ARCHITECTURE.md) names the
modules there are."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_api_snippet_runs_as_written(tmp_path, monkeypatch):
    snippet = re.search(r"## Python API\s+```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "demo.model").is_file()


def test_the_module_map_lists_every_module_and_nothing_else():
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    listed = set(re.findall(r"`([a-z_]+\.py)`", table))
    package = ROOT / "src" / "patchcore"
    actual = {p.name for p in package.rglob("*.py") if p.name not in ("__init__.py", "_version.py")
              and "server" not in p.parts and p.parent.name != "server"}
    assert listed - actual == set(), f"README names modules that do not exist: {sorted(listed - actual)}"
    assert actual - listed == set(), f"modules missing from the README map: {sorted(actual - listed)}"
