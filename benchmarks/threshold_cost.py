"""What the out-of-sample thresholds add to fit (issue 19 point 1), measured.

    python benchmarks/threshold_cost.py --data ../shared/data --varied /tmp/varied --repeats 3

Per data set (bottle, hazelnut, and the varied-crop sets of benchmarks/varied_shapes.py if --varied is given),
EfficientNet-Lite0, 1% bank, fitted `--repeats` times interleaved:
  - the default (every training image scored against a coreset bank of the other folds), and
  - a 10% true hold-out (the previous default's evidence: its calibration is scoring 10% of the images),
with the fit's stages (feature extraction, coreset, calibration) in wall seconds and in CPU seconds of the
process (CPU time is what a loaded shared machine distorts least). Medians; the calibration's share of fit.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from thresholds import data_sets  # benchmarks/thresholds.py, beside this file

from patchcore import PatchCore, PatchCoreConfig
from patchcore.evaluation.datasets import load_split


def timed_fit(paths: list, config: PatchCoreConfig) -> dict:
    """One fit; wall seconds per stage from its report, CPU seconds per stage from the process clock."""
    model = PatchCore(config, device="cpu")
    cpu: dict[str, float] = {}
    stages = {"_extract_training_features": "embed", "_build_bank": "coreset", "_calibrate_out_of_fold": "calibration",
              "_calibrate": "calibration"}
    for method, stage in stages.items():  # wrap the instance's methods: the library is not changed
        original = getattr(model, method)

        def wrapper(*args, _original=original, _stage=stage, **kwargs):
            started = time.process_time()
            try:
                return _original(*args, **kwargs)
            finally:
                cpu[_stage] = cpu.get(_stage, 0.0) + time.process_time() - started
        setattr(model, method, wrapper)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    model.fit(paths)
    report = model.fit_report_
    return {"wall": {"fit": time.perf_counter() - started_wall, "embed": report.embed_seconds,
                     "coreset": report.coreset_seconds, "calibration": report.calibration_seconds},
            "cpu": {"fit": time.process_time() - started_cpu, **cpu},
            "image_threshold": model.image_threshold_, "n_nominal": len(model.calibration_scores_),
            "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--varied", default=None, help="the workdir of benchmarks/varied_shapes.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", default=None, help="comma-separated subset of the data sets")
    parser.add_argument("-o", "--output", default="results/threshold_cost.json")
    args = parser.parse_args()
    sets = data_sets(args.data, args.varied)
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    base = PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=0.01)
    modes = {"k-fold (default)": base, "10% hold-out": dataclasses.replace(base, calibration_ratio=0.1)}
    results: dict = {}
    for name, folder in sets.items():
        paths = load_split(folder).train
        runs: dict[str, list] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode, config in modes.items():
                runs[mode].append(timed_fit(paths, config))
        results[name] = {}
        for mode, records in runs.items():
            summary = {clock: {stage: statistics.median(r[clock].get(stage, 0.0) for r in records)
                               for stage in ("fit", "embed", "coreset", "calibration")} for clock in ("wall", "cpu")}
            for clock in ("wall", "cpu"):
                s = summary[clock]
                s["calibration_share_of_fit"] = s["calibration"] / s["fit"]
            results[name][mode] = {**summary, "image_threshold": records[0]["image_threshold"],
                                   "n_nominal": records[0]["n_nominal"], "loads": [r["load"] for r in records]}
            print(name, mode, json.dumps(results[name][mode]), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print("| set | thresholds from | nominal images | fit s (wall) | calibration s (wall) | fit CPU s | "
          "calibration CPU s | calibration share of fit CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_mode in results.items():
        for mode, r in by_mode.items():
            print(f"| {name} | {mode} | {r['n_nominal']} | {r['wall']['fit']:.1f} | {r['wall']['calibration']:.1f} | "
                  f"{r['cpu']['fit']:.1f} | {r['cpu']['calibration']:.1f} | "
                  f"{100 * r['cpu']['calibration_share_of_fit']:.0f}% |")


if __name__ == "__main__":
    main()
