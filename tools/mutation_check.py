"""Apply known wiring mistakes to a copy of the package, one at a time, and check the test suite catches each.

    .venv/bin/python tools/mutation_check.py [pytest args...]

Each mutation is a change that once left the whole suite green (issue 8). The copy lives in a temporary
folder, so the working tree is never modified. Exit status 0 only if every mutation fails a test.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = {
    "control: no change (must pass, or the check proves nothing)": ("estimator/model.py", "", ""),
    "eq. 7 with temperature 1 (anomalib's inert softmax)": (
        "estimator/model.py", "self.config.reweight_neighbours, state.distance_scale)",
        "self.config.reweight_neighbours, 1.0)"),
    "reweighting turned off": (
        "estimator/model.py", "self.config.reweight_neighbours, state.distance_scale)", "0, state.distance_scale)"),
    "patch_size ignored (p = 1)": (
        "estimator/extractor.py", "patch_embeddings(feature_maps, reductions, self.config.patch_size)",
        "patch_embeddings(feature_maps, reductions, 1)"),
    "random subset instead of the greedy coreset": (
        "estimator/model.py", "greedy_coreset(projected.to(self.device), n, generator=generator)",
        "torch.randperm(projected.shape[0], generator=generator)[:n]"),
    "pixel threshold from the image scores": (
        "estimator/model.py", "pixel_threshold=nominal_threshold(pixel_max)",
        "pixel_threshold=nominal_threshold(scores)"),
}


def main(pytest_args: list[str]) -> int:
    args = pytest_args or ["-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests")]
    survived = []
    for name, (relative, before, after) in MUTATIONS.items():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            shutil.copytree(ROOT / "src" / "patchcore", src / "patchcore")
            target = src / "patchcore" / relative
            text = target.read_text()
            control = before == ""
            if not control and text.count(before) != 1:
                print(f"[stale] {name}: pattern not found once in {relative}; update this script")
                survived.append(name)
                continue
            if not control:
                target.write_text(text.replace(before, after))
            env = dict(os.environ, PYTHONPATH=str(src), OMP_WAIT_POLICY="PASSIVE")
            run = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=tmp, env=env,
                                 capture_output=True, text=True)
            failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
            caught = bool(run.returncode != 0 and failed)
            if control:
                print(f"[{'FAILED' if run.returncode else 'passed'}] {name}")
                if run.returncode:
                    survived.append(name)
                continue
            print(f"[{'caught' if caught else 'SURVIVED'}] {name}: {failed[0] if failed else run.stdout[-300:]}")
            if not caught:
                survived.append(name)
    missed = [s for s in survived if not s.startswith("control")]
    control = "failed" if len(missed) < len(survived) else "passed"
    print(f"{len(MUTATIONS) - 1 - len(missed)} of {len(MUTATIONS) - 1} mutations caught; control {control}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
