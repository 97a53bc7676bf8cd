"""Decisions a line can act on, measured (issue 19): thresholds from out-of-sample training scores, and good
sets with a few bad parts.

    python benchmarks/thresholds.py --data ../shared/data --varied /tmp/varied -o results/thresholds.json

Per data set (bottle, hazelnut, and the varied-crop sets of benchmarks/varied_shapes.py if --varied is given),
EfficientNet-Lite0, 1% bank:
  - thresholds: the previous rule (mean + 3 std of a 10% hold-out, at least its max), the new estimator on that
    true hold-out, and the new default (every training image scored against the bank without its fold's
    rows): expected and observed false alarms on the test's good images, defects caught at the model's
    threshold, and the defects a threshold with the same number of false alarms chosen on the test's good
    images would catch (the best any threshold with that false-alarm count can do);
  - dirty good sets: defect images taken from the test split (which then leaves them out) added to the training
    set, as many as 0, 2, 5 and 10% of it, fitted with and without exclude_outliers: image and pixel AUROC,
    F1, false alarms and defects caught at the model's threshold, and how many of the bad training images fit
    named as suspects.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from patchcore import PatchCore, PatchCoreConfig
from patchcore.core.thresholds import expected_false_alarms, quantile_threshold
from patchcore.evaluation.datasets import load_split
from patchcore.evaluation.evaluate import evaluate_category

RATE = 0.01


def decisions(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    good, bad = labels == 0, labels == 1
    flagged_good = int(np.sum(scores[good] > threshold))
    caught = float(np.mean(scores[bad] > threshold)) if bad.any() else None
    # The best threshold with the same number of false alarms, chosen on the test's good images.
    ranked = np.sort(scores[good])[::-1]
    best = ranked[flagged_good] if flagged_good < len(ranked) else -np.inf
    best_caught = float(np.mean(scores[bad] > best)) if bad.any() else None
    tp = int(np.sum(scores[bad] > threshold))
    f1 = 2 * tp / (2 * tp + flagged_good + int(bad.sum()) - tp) if bad.any() else None
    return {"threshold": float(threshold), "observed_false_alarms": flagged_good / max(1, int(good.sum())),
            "defects_caught": caught, "caught_by_best_threshold_at_same_false_alarms": best_caught,
            "ratio_to_best": None if not best_caught else caught / best_caught, "f1": f1}


def run(split, config: PatchCoreConfig) -> tuple[PatchCore, dict]:
    model = PatchCore(config, device="cpu")
    started = time.perf_counter()
    record = evaluate_category(split, config, model=model)
    record["wall_s"] = time.perf_counter() - started
    return model, record


def data_sets(data: str | Path, varied: str | Path | None) -> dict[str, Path]:
    """name -> category folder: bottle and hazelnut under `data`, and the varied-crop sets of
    benchmarks/varied_shapes.py under `varied` if given."""
    data = Path(data)
    sets = {"bottle": data / "mvtec_ad" / "bottle", "hazelnut": data / "mvtec_ad_reduced" / "hazelnut"}
    if varied:
        sets.update({f"{n}_varied": Path(varied) / f"{n}_varied" for n in ("bottle", "hazelnut")})
    return sets


def thresholds_study(split, base: PatchCoreConfig) -> dict:
    out = {}
    model, record = run(split, base)  # the new default: k-fold out-of-sample scores of every training image
    labels = np.array([r["label"] for r in record["images"]])
    scores = np.array([r["score"] for r in record["images"]])
    estimate = expected_false_alarms(model.calibration_scores_, model.image_threshold_)
    out["k-fold (default)"] = {**decisions(labels, scores, model.image_threshold_), "expected": estimate.rate,
                               "expected_interval": [estimate.low, estimate.high],
                               "n_nominal": len(model.calibration_scores_),
                               "calibration_s": record["timings"]["calibration_seconds"],
                               "fit_s": record["timings"]["fit_seconds"],
                               "image_auroc": record["metrics"]["image_auroc"],
                               "pixel_auroc": record["metrics"]["pixel_auroc"],
                               "suspects": [Path(n).name for n, _ in model.fit_report_.suspects]}
    held, held_record = run(split, dataclasses.replace(base, calibration_ratio=0.1))
    held_labels = np.array([r["label"] for r in held_record["images"]])
    held_scores = np.array([r["score"] for r in held_record["images"]])
    nominal = np.array(held.calibration_scores_)
    old = max(float(nominal.max()), float(nominal.mean() + 3 * nominal.std(ddof=1)))
    out["previous rule (10% hold-out, mean + 3 std)"] = {
        **decisions(held_labels, held_scores, old), "n_nominal": len(nominal),
        "image_auroc": held_record["metrics"]["image_auroc"], "fit_s": held_record["timings"]["fit_seconds"]}
    out["new estimator on the 10% hold-out"] = {
        **decisions(held_labels, held_scores, quantile_threshold(nominal, base.false_alarm_rate)),
        "expected": expected_false_alarms(nominal, quantile_threshold(nominal, base.false_alarm_rate)).rate,
        "n_nominal": len(nominal)}
    return out


def dirty_study(split, base: PatchCoreConfig, shares=(0.0, 0.02, 0.05, 0.1), seed: int = 0,
                modes=(False, True)) -> dict:
    rng = np.random.default_rng(seed)
    defects = [i for i, item in enumerate(split.items) if item.label == 1]
    order = rng.permutation(defects).tolist()
    out = {}
    for share in shares:
        count = int(round(share * len(split.train)))
        moved = set(order[:count])
        dirty = dataclasses.replace(split, train=list(split.train) + [split.items[i].path for i in sorted(moved)],
                                    items=[item for i, item in enumerate(split.items) if i not in moved])
        for exclude in modes:
            model, record = run(dirty, dataclasses.replace(base, exclude_outliers=exclude))
            labels = np.array([r["label"] for r in record["images"]])
            scores = np.array([r["score"] for r in record["images"]])
            named = {n for n, _ in model.fit_report_.suspects}
            bad = {str(split.items[i].path) for i in moved}
            out[f"{100 * share:.0f}% bad, exclude_outliers={exclude}"] = {
                "bad_train_images": count, "image_auroc": record["metrics"]["image_auroc"],
                "pixel_auroc": record["metrics"]["pixel_auroc"], "aupro": record["metrics"]["aupro"],
                **decisions(labels, scores, model.image_threshold_),
                "excluded_patches": model.fit_report_.excluded_patches,
                "suspects": len(model.fit_report_.suspects),
                "bad_named_as_suspects": len(named & bad), "good_named_as_suspects": len(named - bad),
                "fit_s": record["timings"]["fit_seconds"]}
            print(split.name, f"{share:.2f}", exclude, json.dumps(out[f"{100 * share:.0f}% bad, "
                                                                  f"exclude_outliers={exclude}"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--varied", default=None, help="the workdir of benchmarks/varied_shapes.py")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--skip-dirty", action="store_true")
    parser.add_argument("--synthetic", default=None, help="also a synthetic woven set (made here) with 60 good "
                                                          "training images and 10 test images per defect kind")
    parser.add_argument("--only-synthetic", action="store_true")
    parser.add_argument("--exclude-modes", default="false,true", help="exclude_outliers values of the dirty study")
    parser.add_argument("--skip-thresholds", action="store_true")
    parser.add_argument("--sets", default=None, help="comma-separated subset of the data sets")
    parser.add_argument("-o", "--output", default="results/thresholds.json")
    args = parser.parse_args()
    sets = data_sets(args.data, args.varied)
    if args.synthetic:
        from patchcore.evaluation.synthetic import make_category

        root = Path(args.synthetic) / "woven"
        if not root.exists():
            make_category(root, n_train=60, n_test_good=30, n_test_per_defect=10, size=160, seed=19)
        sets = {"synthetic": root} if args.only_synthetic else {**sets, "synthetic": root}
    base = PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=args.coreset_ratio, false_alarm_rate=RATE)
    results: dict = {}
    for name, root in sets.items():
        if args.sets and name not in args.sets.split(","):
            continue
        split = load_split(root)
        results[name] = {}
        if not args.skip_thresholds:
            results[name]["thresholds"] = thresholds_study(split, base)
            print(name, json.dumps(results[name]["thresholds"]), flush=True)
        if not args.skip_dirty and not name.endswith("_varied"):
            modes = tuple(m.strip() == "true" for m in args.exclude_modes.split(","))
            results[name]["dirty"] = dirty_study(split, base, modes=modes)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
