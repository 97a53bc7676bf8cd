"""The package's layers, read from its source: nothing imports upward, no cycles, and argparse, progress
bars and web frameworks only in the application layer (STYLE.md 12)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "patchcore"

# Lower number = lower layer. A module may import from its own layer or any lower one.
LAYERS = {
    "patchcore._version": 0, "patchcore.errors": 0, "patchcore.config": 0,
    "patchcore.core": 1,
    "patchcore.backbones": 2, "patchcore.io": 2,
    "patchcore.estimator": 3,
    "patchcore.runtime": 3,  # scores without torch: below evaluation and app, never importing the estimator
    "patchcore.evaluation": 4,
    "patchcore.app": 5,
}
APP_ONLY = {"argparse", "tqdm", "fastapi", "starlette", "uvicorn", "flask", "aiohttp", "jinja2", "multipart",
            "python_multipart", "prometheus_client", "selenium", "playwright"}


# The cluster engine (Ray, an optional extra) lives in these application modules only.
RAY_ONLY = {"ray"}
RAY_MODULES = ("patchcore.app.ray_predict", "patchcore.app.ray_scoring", "patchcore.app.ray_torch_backends",
               "patchcore.app.ray_fit", "patchcore.app.ray_cluster")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for prefix, layer in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def imports_of(path: Path, *, top_level: bool = False) -> list[str]:
    """Absolute names of everything a module imports, relative imports resolved, lazy ones included (top_level:
    only the statements run when the module is imported)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` may import a submodule x: count both the package and the submodule.
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for target in imports_of(path):
            # resolve to the longest known module name
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("patchcore"):
                targets.add(target)
        graph[name] = targets
    return graph


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if m != "patchcore" and layer_of(m) is None)
    assert not unplaced, f"modules outside the layer map: {unplaced}"


TORCH = {"torch", "torchvision", "timm"}


def top_level_imports(path: Path) -> list[str]:
    """What a module imports when it is imported (not inside functions, not under TYPE_CHECKING)."""
    return imports_of(path, top_level=True)


def import_closure(start: str) -> set[str]:
    """The package modules importing `start` loads (its parents' __init__ included), transitively."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for target in top_level_imports(MODULES[name]):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("patchcore"):
                todo.append(target)
    return seen


def test_the_runtime_imports_no_torch():
    """`import patchcore.runtime` must work on a line PC without torch (issue 17): no module it loads imports
    torch, torchvision or timm at import time, and it never reaches the estimator."""
    loaded = import_closure("patchcore.runtime") | import_closure("patchcore.app.score_cli")  # + its command
    assert not any(m.startswith("patchcore.estimator") for m in loaded), sorted(loaded)
    offenders = sorted(f"{m} imports {t}" for m in loaded for t in top_level_imports(MODULES[m])
                       if t.split(".")[0] in TORCH)
    assert not offenders, offenders


def test_no_module_imports_the_package_facade():
    offenders = sorted(name for name, targets in internal_graph().items()
                       if name != "patchcore" and "patchcore" in targets)
    assert not offenders, f"import from the layer that defines them instead of `patchcore`: {offenders}"


def test_no_upward_imports():
    upward = []
    for name, targets in internal_graph().items():
        if name == "patchcore":
            continue
        for target in targets:
            # a package's __init__ imports its own submodules; that is not upward
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "upward imports: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    graph = internal_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_application_libraries_only_in_the_application_layer():
    offenders = []
    for name, path in MODULES.items():
        if name == "patchcore" or layer_of(name) == LAYERS["patchcore.app"]:
            continue
        for target in imports_of(path):
            if target.split(".")[0] in APP_ONLY:
                offenders.append(f"{name} imports {target}")
    assert not offenders, offenders


def test_ray_only_in_its_engine_modules():
    offenders = [f"{name} imports {target}" for name, path in MODULES.items() if name not in RAY_MODULES
                 for target in imports_of(path) if target.split(".")[0] in RAY_ONLY]
    assert not offenders, offenders


@pytest.mark.parametrize("source, expected", [
    ("from ..app.cli import main\n", "upward"),
    ("import tqdm\n", "app-only"),
    ("import ray.data\n", "ray-only"),
])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, expected):
    """The rules above are live: plant an offending module in a copy of the layer map and see it flagged."""
    planted = PACKAGE / "core" / "_planted_violation.py"
    monkeypatch.setitem(MODULES, "patchcore.core._planted_violation", planted)
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == planted else original(self, *a, **k))
    if expected == "upward":
        with pytest.raises(AssertionError, match="patchcore.core._planted_violation -> patchcore.app.cli"):
            test_no_upward_imports()
    elif expected == "ray-only":
        with pytest.raises(AssertionError, match="_planted_violation imports ray.data"):
            test_ray_only_in_its_engine_modules()
    else:
        with pytest.raises(AssertionError, match="_planted_violation imports tqdm"):
            test_application_libraries_only_in_the_application_layer()
