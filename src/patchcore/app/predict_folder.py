"""Score a list of image files into an output folder: heatmaps, overlays, masks, optional raw maps,
and the scores table (scores.csv, scores.json)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ImageReadError
from ..estimator import PatchCore
from ..evaluation.progress import Progress, no_progress
from ..io.render import colormap, normalise_map, overlay


def predict_to_folder(model: PatchCore, paths: list[Path], output: Path, *, progress: Progress = no_progress,
                      save_maps: bool = False) -> tuple[list[dict], list[ImageReadError]]:
    """Score `paths` batch by batch and write heatmaps, overlays, masks and the scores table."""
    names = output_names(paths)
    subfolders = ["heatmaps", "overlays"]
    if model.pixel_threshold_ is not None:
        subfolders.append("masks")
    if save_maps:
        subfolders.append("maps")
    for sub in subfolders:
        (output / sub).mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    with progress(len(paths), "predict") as bar:
        for batch in model.iter_predict(paths):
            failures += batch.failures
            bar.update(len(batch.paths) + len(batch.failures))
            result = batch.result
            for i, path in enumerate(batch.paths):
                name = names[path]
                anomaly_map = result.maps[i].numpy()
                heat = colormap(normalise_map(anomaly_map, model.pixel_threshold_))
                Image.fromarray(heat).save(output / "heatmaps" / f"{name}.png")
                picture = model.preprocess.geometry(batch.images[i]).permute(1, 2, 0).numpy()
                mask = None if result.masks is None else result.masks[i].numpy()
                Image.fromarray(overlay(picture, heat, mask)).save(output / "overlays" / f"{name}.png")
                if mask is not None:
                    Image.fromarray((mask * 255).astype(np.uint8)).save(output / "masks" / f"{name}.png")
                if save_maps:
                    np.save(output / "maps" / f"{name}.npy", anomaly_map)
                label = "" if result.labels is None else ("defect" if bool(result.labels[i]) else "good")
                rows.append({"file": str(path), "name": name, "score": float(result.scores[i]), "label": label})
    write_scores(output, rows, model, failures)
    return rows, failures


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Unique, readable output names: the path below the inputs' common folder, '/' -> '_'
    (MVTec's test/crack/000.png and test/good/000.png become crack_000 and good_000)."""
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if resolved else Path(".")
    names, used = {}, set()
    for path, full in zip(paths, resolved):
        base = "_".join(full.relative_to(common).with_suffix("").parts)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names[path] = name
    return names


def write_scores(output: Path, rows: list[dict], model: PatchCore, failures: list[ImageReadError]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "name", "score", "label"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {"image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_,
               "map_geometry": {"input_size": list(model.input_size_), "resize": model.config.resize,
                                "crop": model.config.crop},
               "images": rows, "failures": [{"file": f.path, "error": f.reason} for f in failures]}
    (output / "scores.json").write_text(json.dumps(summary, indent=1))
