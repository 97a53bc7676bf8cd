"""Parts of every shape and size, measured (issue 15): which geometry finds what on varied crops.

    python benchmarks/varied_shapes.py --data ../shared/data --workdir /tmp/varied -o results/varied_shapes.json

Makes two varied-size, varied-aspect categories from real MVTec AD images (bottle 900 x 900, hazelnut
256 x 256): every image is a random crop of 30-80% of its area with height / width between 0.4 and 2.8;
defect images are cropped so that the crop holds the defect's centre, and masks are cropped with them.
Then each geometry is fitted on the crops and scored with `evaluate_category` (pixel metrics at each image's
original size):
  - "224 crop": the MVTec protocol (shorter side 256, centre crop 224);
  - "median-aspect H,W": the previous default (one exact size at the median aspect within the pixel
    budget, sides multiples of 16; images more than 1.25x off that aspect are refused per file);
  - "one scale (default)": geometry auto, one factor for every image, aspect kept;
  - "shorter side": a per-image rule (shorter side to the size that gives the median image the same
    pixels as the default), aspect kept, no crop.
It also times predict (from files, median of 3) on the varied test set against a same-size set of equal
total pixels, for the cost of mixed sizes in batches.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
from PIL import Image

from patchcore import PatchCore, PatchCoreConfig
from patchcore.estimator.geometry import choose_scale
from patchcore.evaluation.datasets import load_split
from patchcore.evaluation.evaluate import evaluate_category
from patchcore.io.sizing import resized_size

BUDGET = 320 * 320


def random_crop(rng, height, width, centre=None):
    """(top, left, h, w): 30-80% of the area, H/W in [0.4, 2.8], holding `centre` (y, x) if given."""
    for _ in range(1000):
        area = rng.uniform(0.3, 0.8) * height * width
        aspect = math.exp(rng.uniform(math.log(0.4), math.log(2.8)))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (16 <= h <= height and 16 <= w <= width):
            continue
        if centre is None:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        cy, cx = centre
        top_lo, top_hi = max(0, cy - h + 1), min(height - h, cy)
        left_lo, left_hi = max(0, cx - w + 1), min(width - w, cx)
        if top_lo <= top_hi and left_lo <= left_hi:
            return int(rng.integers(top_lo, top_hi + 1)), int(rng.integers(left_lo, left_hi + 1)), h, w
    raise RuntimeError("no crop found")


def make_varied(source: Path, target: Path, seed: int) -> Path:
    """The MVTec category `source` as varied crops under `target` (same layout)."""
    rng = np.random.default_rng(seed)
    for path in sorted(source.rglob("*.png")):
        relative = path.relative_to(source)
        if relative.parts[0] == "ground_truth":
            continue
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = None
        if relative.parts[0] == "test" and relative.parts[1] != "good":
            mask_path = source / "ground_truth" / relative.parts[1] / f"{path.stem}_mask.png"
            mask = np.asarray(Image.open(mask_path)) > 0
        centre = None
        if mask is not None and mask.any():
            ys, xs = np.nonzero(mask)
            k = int(rng.integers(len(ys)))
            centre = (int(ys[k]), int(xs[k]))
        top, left, h, w = random_crop(rng, *image.shape[:2], centre)
        out = target / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[top:top + h, left:left + w]).save(out)
        if mask is not None:
            mask_out = target / "ground_truth" / relative.parts[1] / f"{path.stem}_mask.png"
            mask_out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((mask[top:top + h, left:left + w] * 255).astype(np.uint8)).save(mask_out)
    return target


def median_aspect_size(sizes, budget):
    """The previous default: (H, W) at the median aspect within the budget, sides multiples of 16."""
    aspect = statistics.median(h / w for h, w in sizes)
    width = math.sqrt(budget / aspect)
    height = aspect * width
    options = [(max(16, h), max(16, w)) for h in (int(height) // 16 * 16, -(-int(height) // 16) * 16)
               for w in (int(width) // 16 * 16, -(-int(width) // 16) * 16)]
    within = [o for o in options if o[0] * o[1] <= budget] or [min(options, key=lambda o: o[0] * o[1])]
    return min(within, key=lambda o: (abs(math.log(o[0] / o[1] / aspect)), -o[0] * o[1]))


def geometries(train_sizes):
    scale = choose_scale(train_sizes, BUDGET)
    median = sorted(train_sizes, key=lambda s: s[0] * s[1])[len(train_sizes) // 2]
    shorter = int(round(min(median) * scale))
    return {
        "224 crop": {"resize": 256, "crop": 224, "geometry": "mvtec"},
        "median-aspect H,W": {"resize": median_aspect_size(train_sizes, BUDGET), "crop": None},
        "one scale (default)": {},
        f"shorter side {shorter}": {"resize": shorter, "crop": None},
    }


def time_predict(model, paths, repeats=3):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _batch in model.iter_predict(paths):
            pass
        times.append((time.perf_counter() - started) / len(paths) * 1000)
    return statistics.median(times)


def same_size_set(paths, target: Path) -> list[Path]:
    """As many images as `paths`, one square size, the same total pixels (centre crops, resized)."""
    sizes = [Image.open(p).size for p in paths]
    side = int(round(math.sqrt(sum(w * h for w, h in sizes) / len(sizes))))
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
        out.append(target / f"{i:04d}.png")
        image.save(out[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--workdir", default="/tmp/varied-shapes")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--categories", default="bottle,hazelnut")
    parser.add_argument("-o", "--output", default="results/varied_shapes.json")
    args = parser.parse_args()
    data = Path(args.data)
    sources = {"bottle": data / "mvtec_ad" / "bottle", "hazelnut": data / "mvtec_ad_reduced" / "hazelnut"}
    results = {}
    for name in args.categories.split(","):
        root = Path(args.workdir) / f"{name}_varied"
        if not root.exists():
            make_varied(sources[name], root, seed=15)
        split = load_split(root)
        train_sizes = [Image.open(p).size[::-1] for p in split.train]
        aspects = [h / w for h, w in train_sizes]
        results[name] = {"train_images": len(train_sizes), "test_images": len(split.items),
                         "train_aspect_range": [min(aspects), max(aspects)],
                         "train_side_range": [min(min(s) for s in train_sizes), max(max(s) for s in train_sizes)],
                         "geometries": {}}
        for label, settings in geometries(train_sizes).items():
            config = PatchCoreConfig(backbone=args.backbone, coreset_ratio=args.coreset_ratio, pixel_budget=BUDGET,
                                     **settings)
            model = PatchCore(config, device="cpu")
            record = evaluate_category(split, config, model=model)
            m, t = record["metrics"], record["timings"]
            row = {"settings": record["settings"], "geometry": record["fit"]["geometry"],
                   "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
                   "at_threshold": {k: record["at_training_threshold"].get(k) for k in
                                    ("threshold", "recall", "false_positives", "true_negatives")},
                   "fit_s": t["fit_seconds"], "predict_ms_per_image": t["predict_ms_per_image"],
                   "train_skipped": len(record["failures"]["train_images"]),
                   "test_refused": len(record["failures"]["test_images"]),
                   "bank": record["fit"]["coreset_size"], "patches": record["fit"]["n_patches"]}
            results[name]["geometries"][label] = row
            print(name, label, json.dumps({k: row[k] for k in ("image_auroc", "pixel_auroc", "aupro", "fit_s",
                                                               "predict_ms_per_image", "train_skipped",
                                                               "test_refused")}), flush=True)
            if label == "one scale (default)":
                paths = [item.path for item in split.items]
                same = same_size_set(paths, Path(args.workdir) / f"{name}_same_size")
                mixed_ms, same_ms = time_predict(model, paths), time_predict(model, same)
                results[name]["mixed_vs_same_size"] = {
                    "mixed_ms_per_image": mixed_ms, "same_size_ms_per_image": same_ms, "ratio": mixed_ms / same_ms,
                    "distinct_model_input_sizes": len({resized_size(h, w, None, scale=model.config.scale,
                                                                    align=16) for h, w in
                                                       (Image.open(p).size[::-1] for p in paths)})}
                print(name, "mixed vs same size", json.dumps(results[name]["mixed_vs_same_size"]), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
