"""Ensembles against each backbone alone (issue 19 point 5, paper section 4.4.1), measured.

    python benchmarks/ensemble.py --data bottle=../shared/data/mvtec_ad/bottle \
        --data hazelnut=../shared/data/mvtec_ad_reduced/hazelnut -o results/ensemble.json

For each category: every backbone is fitted alone (defaults: MVTec 256/224, coreset 1%) and scored with
`evaluate_category` (image AUROC, pixel AUROC and AUPRO at each image's original size, image F1 and false
alarms at the model's own threshold); then the ensemble of the fitted members: its fit is the members' fits
plus its normalisation pass (the members are not fitted twice), scored the same way. Predict time: the
decoded test images scored by every model in turn, `--repeats` rounds interleaved, median (ratios from one
run on a shared CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.estimator.ensemble import PatchCoreEnsemble
from patchcore.evaluation.datasets import load_split
from patchcore.evaluation.evaluate import evaluate_category
from patchcore.io.images import as_uint8_tensor, read_image


class _FromFitted(PatchCoreEnsemble):
    """An ensemble of already fitted members: its fit is the normalisation pass alone."""

    def fit(self, images, **_):
        return self.calibrate(images)


def _row(name: str, record: dict, fit_seconds: float) -> dict:
    m, t = record["metrics"], record["at_training_threshold"]
    good = record["n_images"]["test_good"]
    return {"model": name, "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
            "image_f1_max": m["image_f1_max"], "threshold": t.get("threshold"), "f1_at_threshold": t.get("f1"),
            "recall_at_threshold": t.get("recall"), "false_alarms": t.get("false_positives"), "test_good": good,
            "observed_false_alarm_rate": t.get("observed_false_alarm_rate"),
            "expected_false_alarm_rate": t.get("expected_false_alarm_rate"), "fit_seconds": fit_seconds,
            "predict_ms_per_image_evaluate": record["timings"]["predict_ms_per_image"]}


def run_category(name: str, folder: Path, backbones: list[str], ratio: float, repeats: int,
                 pixel_resolution: str, subsets: list[list[int]]) -> dict:
    split = load_split(folder)
    rows, members = [], []
    for backbone in backbones:
        config = PatchCoreConfig(backbone=backbone, coreset_ratio=ratio)
        model = PatchCore(config, device="cpu")
        record = evaluate_category(split, config, model=model, pixel_resolution=pixel_resolution)
        rows.append(_row(backbone, record, record["timings"]["fit_seconds"]))
        members.append(model)
        print(json.dumps(rows[-1]), flush=True)
    models = {b: m for b, m in zip(backbones, members)}
    for subset in subsets:
        chosen = [members[i] for i in subset]
        label = "+".join(backbones[i] for i in subset)
        ensemble = _FromFitted.from_members(chosen)
        config = PatchCoreConfig(backbone=",".join(backbones[i] for i in subset), coreset_ratio=ratio)
        record = evaluate_category(split, config, model=ensemble, pixel_resolution=pixel_resolution)
        normalisation = record["timings"]["fit_seconds"]
        row = _row(f"ensemble {label}", record, sum(rows[i]["fit_seconds"] for i in subset) + normalisation)
        row["normalisation_seconds"] = normalisation
        row["image_normalisers"] = [[n.location, n.scale] for n in ensemble.ensemble_state_.image]
        row["pixel_normalisers"] = [[n.location, n.scale] for n in ensemble.ensemble_state_.pixel]
        rows.append(row)
        models[f"ensemble {label}"] = ensemble
        print(json.dumps(row), flush=True)
    # predict time on decoded images: every model in turn, rounds interleaved, median
    images = [as_uint8_tensor(read_image(item.path)) for item in split.items]
    times: dict[str, list[float]] = {key: [] for key in models}
    for _ in range(repeats):
        for key, model in models.items():
            started = time.perf_counter()
            model.predict(images)
            times[key].append(1000 * (time.perf_counter() - started) / len(images))
    by_name = {row["model"]: row for row in rows}
    for key, values in times.items():
        by_name[key]["predict_ms_per_image"] = statistics.median(values)
    return {"category": name, "n_train": len(split.train), "n_test": len(split.items), "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| category | model | image AUROC | pixel AUROC | AUPRO | F1 at threshold | false alarms (good) | "
             "fit s | predict ms/img |", "|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    for result in results:
        for r in result["rows"]:
            lines.append(f"| {result['category']} | {r['model']} | {pct(r['image_auroc'])} | {pct(r['pixel_auroc'])} | "
                         f"{pct(r['aupro'])} | {pct(r['f1_at_threshold'])} | {r['false_alarms']} / {r['test_good']} | "
                         f"{r['fit_seconds']:.1f} | {r['predict_ms_per_image']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", action="append", required=True, help="NAME=FOLDER of an MVTec-layout category")
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixel-resolution", default="original", choices=["original", "model"])
    parser.add_argument("--pairs", action="store_true", help="also every pair of backbones")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    backbones = args.backbones.split(",")
    subsets = [list(range(len(backbones)))]
    if args.pairs:
        subsets += [[i, j] for i in range(len(backbones)) for j in range(i + 1, len(backbones))]
    results = []
    for item in args.data:
        name, folder = item.split("=", 1)
        results.append(run_category(name, Path(folder), backbones, args.coreset_ratio, args.repeats,
                                    args.pixel_resolution, subsets))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
