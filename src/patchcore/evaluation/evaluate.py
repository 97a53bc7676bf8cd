"""`patchcore evaluate`: the MVTec AD protocol (PATCHCORE.md section 4) on one or more categories.

Per category: fit on the training images, score every test image, then compute image AUROC, pixel
AUROC, AUPRO (to FPR 0.3, normalised), image and pixel F1-max. Nothing is fitted on the test split:
the only threshold applied is the model's own, calibrated on held-out training images. Results go
to <output>/<category>.json, summary.json and results.md, rewritten after every category.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..config import PatchCoreConfig
from ..core.thresholds import expected_false_alarms
from ..errors import DatasetError, PatchCoreError
from ..estimator import PatchCore
from ..estimator.ensemble import build_model
from ..io.images import as_uint8_tensor, read_image
from ..io.preprocess import Preprocess
from .datasets import TestSet, find_categories, image_size, load_split, read_mask
from .metrics import image_metrics, pixel_metrics
from .pixel_stream import StreamingPixelMetrics
from .progress import Progress, no_progress

logger = logging.getLogger("patchcore")

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
AUPRO_FPR_LIMIT = 0.3
METRIC_NOTES = {
    "image_auroc": "AUROC of image scores, good = 0, any defect = 1",
    "pixel_auroc": "AUROC over all pixels of all test images (good images: empty masks)",
    "aupro": f"per-region overlap (8-connected regions) integrated up to FPR {AUPRO_FPR_LIMIT}, divided by it",
    "image_f1_max": "best F1 over all thresholds on the test scores: a protocol metric, not a deployable "
                    "operating point (its threshold is deliberately not reported)",
    "pixel_f1_max": "best F1 over all thresholds on the test pixels: a protocol metric, like image_f1_max",
}


# ---------------------------------------------------------------------------- ground truth
def check_masks(split: TestSet) -> None:
    """Every mask readable and the size of its image: before fitting, so a bad mask fails in seconds."""
    for item in split.items:
        if item.mask_path is None:
            continue
        mask = read_mask(item.mask_path)
        try:
            expected = image_size(item.path)
        except DatasetError:  # an unreadable test image is a per-file failure of scoring, not of its mask
            continue
        if mask.shape != expected:
            raise DatasetError(f"{item.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image "
                               f"{item.path} is {expected[0]}x{expected[1]} (H x W)")


def load_masks(split: TestSet, preprocess: Preprocess) -> dict[int, np.ndarray]:
    """Test item index -> its ground truth at model geometry (the fitted model's: the geometry fit chose),
    for defect images that have a mask."""
    return {i: preprocess.mask_geometry(read_mask(item.mask_path))
            for i, item in enumerate(split.items) if item.mask_path is not None}


def geometry_text(config: PatchCoreConfig) -> str:
    """'resize 256, centre crop 224' or 'one scale x0.4 for every image, aspect kept'."""
    if config.scale is not None:
        return f"one scale x{config.scale:g} for every image, aspect kept"

    def size(value) -> str:
        return str(value) if isinstance(value, int) else f"{value[0]}x{value[1]}"

    resize = "no resize" if config.resize is None else f"resize {size(config.resize)}"
    crop = "no crop" if config.crop is None else f"centre crop {size(config.crop)}"
    return f"{resize}, {crop}"


def resolution_text(config: PatchCoreConfig, input_size: tuple[int, int]) -> str:
    """'pixel metrics at 224x224 model input geometry (resize 256, centre crop 224)'."""
    return f"pixel metrics at {input_size[0]}x{input_size[1]} model input geometry ({geometry_text(config)})"


def _view_notes(split: TestSet, preprocess: Preprocess, masks: dict[int, np.ndarray]) -> list[str]:
    """Warn when the centre crop hides much of the image, or all of some defects."""
    notes = []
    height, width = image_size(split.items[0].path)
    resized, kept = preprocess.resized_size(height, width), preprocess.output_size(height, width)
    share = kept[0] * kept[1] / (resized[0] * resized[1])
    if share < 0.5:
        notes.append(f"the centre crop {kept[0]}x{kept[1]} keeps {100 * share:.0f}% of a resized "
                     f"{resized[0]}x{resized[1]} image ({split.items[0].path.name}); defects outside it cannot be "
                     f"found. For elongated images consider --resize H,W --crop none")
    hidden = [split.items[i].path.name for i, mask in masks.items() if not mask.any()]
    if hidden:
        notes.append(f"{len(hidden)} defect image(s) have no mask pixel inside the model's view (e.g. {hidden[0]}); "
                     f"they count as defects at image level and add no defect pixels")
    return notes


# ---------------------------------------------------------------------------- metrics
def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Image-level confusion counts and rates at a fixed threshold (defect when score > threshold)."""
    y = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) > threshold  # the model's own rule (PatchCore._score_uint8)
    tp, fp = int(np.sum(predicted & y)), int(np.sum(predicted & ~y))
    fn, tn = int(np.sum(~predicted & y)), int(np.sum(~predicted & ~y))
    precision = tp / (tp + fp) if tp + fp else None  # undefined when nothing is flagged
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"threshold": float(threshold), "accuracy": (tp + tn) / len(y), "precision": precision,
            "recall": recall, "f1": f1, "true_positives": tp, "false_positives": fp,
            "true_negatives": tn, "false_negatives": fn}


def false_alarm_rates(model: PatchCore, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """What the model's image threshold was expected to flag among good parts (from its nominal scores,
    PATCHCORE.md section 5) and what it flagged among the test's good images."""
    good = np.asarray(labels) == 0
    observed = float(np.mean(scores[good] > model.image_threshold_)) if good.any() else None
    values: dict[str, Any] = {"target_false_alarm_rate": model.config.false_alarm_rate,
                              "observed_false_alarm_rate": observed}
    if hasattr(model, "expected_false_alarms"):  # an ensemble: its combined scores have their own nominal model
        estimate = model.expected_false_alarms(model.image_threshold_)
        values.update(expected_false_alarm_rate=estimate.rate,
                      expected_false_alarm_interval=[estimate.low, estimate.high])
    elif len(model.calibration_scores_) >= 2:
        estimate = expected_false_alarms(model.calibration_scores_, model.image_threshold_, seed=model.config.seed)
        values.update(expected_false_alarm_rate=estimate.rate,
                      expected_false_alarm_interval=[estimate.low, estimate.high])
    return values


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------- pixel metrics
PIXEL_RESOLUTIONS = ("original", "model")


def _subset_image_auroc(labels: np.ndarray, scores: np.ndarray, split: TestSet, defect_type: str) -> float | None:
    keep = np.array([item.defect_type in ("good", defect_type) for item in split.items])
    if len(set(labels[keep].tolist())) < 2:
        return None
    return image_metrics(labels[keep], scores[keep])["image_auroc"]


def _pixel_results(split: TestSet, model: PatchCore, maps: list[np.ndarray], masks: dict[int, np.ndarray],
                   pixel_resolution: str):
    """(overall metrics, per defect type metrics, pixel curves, resolution text), or None without defect pixels.

    maps: one (h_i, w_i) map per test item, at its model input size (sizes differ when the images do).
    "model": metrics at the model input geometry (masks resized nearest-neighbour and cropped); exact when
    every map has one size, else accumulated in score bins like "original".
    "original": at each image's own size, as the MVTec protocol: the maps are up-sampled one image at a time
    and the metrics accumulated in score bins (pixel_stream.py), so memory does not grow with the image
    size; pixels outside the model's view (the crop) count as not flagged.
    """
    if pixel_resolution not in PIXEL_RESOLUTIONS:
        raise DatasetError(f"pixel_resolution must be one of {PIXEL_RESOLUTIONS}, got {pixel_resolution!r}")
    types = [item.defect_type for item in split.items]
    defect_types = sorted({t for t in types if t != "good"})
    low, high = min(float(np.nanmin(m)) for m in maps), max(float(np.nanmax(m)) for m in maps)
    stream = StreamingPixelMetrics(low, high, fpr_limit=AUPRO_FPR_LIMIT)
    map_sizes = sorted({m.shape for m in maps})
    if pixel_resolution == "model":
        for i, mask in masks.items():
            if mask.shape != maps[i].shape:
                raise DatasetError(f"{split.items[i].mask_path}: mask at model geometry is {mask.shape}, "
                                   f"its anomaly map is {maps[i].shape}")
        gt = [masks[i] if i in masks else np.zeros(m.shape, dtype=bool) for i, m in enumerate(maps)]
        if not any(g.any() for g in gt):
            return None
        for i in range(len(types)):
            stream.add(gt[i], maps[i], types[i])
        if len(map_sizes) > 1:  # images of several model input sizes: binned, as at the original resolution
            overall = stream.metrics()
            by_type = {t: {k: v for k, v in stream.metrics(["good", t]).items() if k != "unseen_defect_share"}
                       for t in defect_types}
            text = (f"pixel metrics at each image's model input size ({_sizes_text(map_sizes)}; "
                    f"{geometry_text(model.config)}), binned over {stream.bins} score levels; masks resized "
                    "nearest-neighbour, any non-zero = defect")
            return overall, by_type, stream.curves(), text
        gt_stack, maps_stack = np.stack(gt), np.stack(maps)
        overall = pixel_metrics(gt_stack, maps_stack, fpr_limit=AUPRO_FPR_LIMIT)  # exact
        by_type = {}
        for t in defect_types:
            keep = np.array([x in ("good", t) for x in types])
            by_type[t] = (pixel_metrics(gt_stack[keep], maps_stack[keep], fpr_limit=AUPRO_FPR_LIMIT)
                          if gt_stack[keep].any() else dict.fromkeys(("pixel_auroc", "pixel_f1_max", "aupro")))
        text = resolution_text(model.config, map_sizes[0]) + "; masks resized nearest-neighbour, any non-zero = defect"
        return overall, by_type, stream.curves(), text
    sizes = set()
    for i, item in enumerate(split.items):
        height, width = image_size(item.path)
        sizes.add((height, width))
        full = model.maps_at_original_size(torch.from_numpy(maps[i][None]), (height, width))[0].numpy()
        mask = read_mask(item.mask_path) if item.mask_path is not None else np.zeros((height, width), bool)
        stream.add(mask, full, types[i])
    overall = stream.metrics()
    if overall["pixel_auroc"] is None:
        return None
    by_type = {t: {k: v for k, v in stream.metrics(["good", t]).items() if k != "unseen_defect_share"}
               for t in defect_types}
    text = (f"pixel metrics at each image's original resolution ({_sizes_text(sorted(sizes))}; maps up-sampled "
            f"bilinearly from the {_sizes_text(map_sizes)} model input{'s' if len(map_sizes) > 1 else ''}, binned "
            f"over {stream.bins} score levels); "
            f"{100 * overall['unseen_defect_share']:.1f}% of defect pixels lie outside the model's view and "
            "count as not flagged")
    return overall, by_type, stream.curves(), text


def _sizes_text(sizes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (f" ... {len(sizes)} sizes" if len(sizes) > 3 else "")



def _category_report(split: TestSet, model: PatchCore, scores, labels, maps, masks, metrics, per_type,
                     pixel_curves, resolution: str, notes: list[str]):
    """The report.html section of one category; gallery pictures are decoded again only for its images."""
    from .report import category_report

    def picture(i: int) -> np.ndarray:
        image = as_uint8_tensor(read_image(split.items[i].path))
        return model.preprocess.geometry(image).permute(1, 2, 0).numpy()

    return category_report(
        split.name, scores, labels, [item.defect_type for item in split.items],
        threshold=model.image_threshold_, metrics=metrics, resolution=resolution, settings=model.config.to_dict(),
        maps=maps, masks=masks if split.has_masks else None, per_type=per_type, pixel_curves=pixel_curves,
        pixel_threshold=model.pixel_threshold_, pictures=picture,
        files=[item.path.relative_to(split.root).as_posix() for item in split.items], notes=notes)


# ---------------------------------------------------------------------------- one category
def evaluate_category(split: TestSet, config: PatchCoreConfig, *, device: str = "auto",
                      max_feature_memory: int = 1 << 30, progress: Progress = no_progress,
                      model: PatchCore | None = None, pixel_resolution: str = "original",
                      reports: list | None = None, on_metrics: Callable[[dict], None] | None = None
                      ) -> dict[str, Any]:
    """Fit on split.train, score split.items, return the category's JSON record.

    `reports`: if given, the category's report.html section (a report.CategoryReport) is appended to it; a
    failure while drawing it is a note in the record, not an error. `on_metrics(record)`: called as soon as the
    metrics are known, before the report is drawn (evaluate writes the category's JSON there).
    Unreadable test images are per-file failures (record["failures"], record["partial"]), the rest scored.
    `pixel_resolution`: "original" (the MVTec protocol: each image's own size, maps up-sampled one image at
    a time, streaming metrics) or "model" (the model input geometry, masks resized; exact metrics).

    `model`: an unfitted PatchCore to use (and leave fitted for the caller, e.g. the benchmark).
    `progress(total, description)`: a context manager with `update(n)`, e.g. a progress bar."""
    model = model if model is not None else build_model(config, device=device)  # backbone a,b: an ensemble
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    started = time.perf_counter()
    model.preprocess  # noqa: B018 - builds the backbone (loads weights); not counted as fit time
    backbone_seconds = time.perf_counter() - started
    check_masks(split)  # before fitting: a bad mask fails in seconds, not after the fit

    started = time.perf_counter()
    with progress(len(split.train), f"{split.name} fit") as bar:
        model.fit(split.train, progress=bar.update, max_feature_memory=max_feature_memory)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    fit_seconds = time.perf_counter() - started
    peak_after_fit = peak_rss_mib()
    report = model.fit_report_

    paths = [item.path for item in split.items]
    started = time.perf_counter()
    scored, scores, maps, test_failures = _score_test_set(split, model, progress)
    predict_seconds = time.perf_counter() - started
    for failure in test_failures:
        logger.warning("test image not scored: %s", failure)

    started = time.perf_counter()
    masks = load_masks(scored, model.preprocess)  # at the geometry fit chose, not the one it started from
    labels = np.asarray(scored.labels)
    metrics: dict[str, float | None] = dict.fromkeys(METRICS)
    image = image_metrics(labels, scores)
    metrics["image_auroc"], metrics["image_f1_max"] = image["image_auroc"], image["image_f1_max"]
    notes = list(split.notes) + _view_notes(scored, model.preprocess, masks)
    if test_failures:
        notes.append(f"{len(test_failures)} of {len(paths)} test images could not be read or scored and are left "
                     "out of every metric (failures.test_images): the results are partial")
    if report.skipped:
        notes.append(f"{len(report.skipped)} training image(s) could not be read and were skipped "
                     "(failures.train_images)")
    per_type = {t: {"n": sum(item.defect_type == t for item in scored.items),
                    "image_auroc": _subset_image_auroc(labels, scores, scored, t)}
                for t in scored.defect_types if t != "good"}
    pixel_curves = None  # for the report
    if scored.has_masks:
        pixel = _pixel_results(scored, model, maps, masks, pixel_resolution)
        if pixel is None:
            notes.append("all ground-truth masks are empty at the model geometry: no pixel metrics")
            resolution = "no pixel metrics (every mask is empty where the model looks)"
        else:
            overall, by_type, pixel_curves, resolution = pixel
            metrics.update({k: overall[k] for k in ("pixel_auroc", "pixel_f1_max", "aupro")})
            for t, values in by_type.items():
                per_type[t].update(values)
    else:
        resolution = "no pixel metrics (no ground-truth masks)"
    metrics_seconds = time.perf_counter() - started

    predicted = None
    if model.image_threshold_ is not None:
        at_threshold = {
            "description": (f"image decisions at the model's own threshold, set by fit {report.thresholds}; no test "
                            "image was used to choose it"),
            "n_held_out_train_images": report.n_calibration_images,
            **threshold_metrics(labels, scores, model.image_threshold_),
            **false_alarm_rates(model, labels, scores),
            "suspect_train_images": [name for name, _ in report.suspects],
        }
        predicted = scores > model.image_threshold_
    else:
        at_threshold = {"description": "no decision threshold: fewer than 10 training images"}

    record = {
        "category": split.name,
        "root": str(split.root),
        "layout": split.layout,
        "package_version": __version__,
        "settings": model.config.to_dict(),  # as fit chose it (geometry auto may set the scale)
        "device": _device_text(model.device),
        "n_images": {
            "train": len(split.train), "train_fitted": report.n_images,
            "train_held_out_for_threshold": report.n_calibration_images, "test": len(split.items),
            "test_scored": len(scored.items),
            "test_good": int(np.sum(labels == 0)), "test_defect": int(np.sum(labels == 1)),
            "test_by_type": {t: sum(i.defect_type == t for i in scored.items) for t in scored.defect_types},
        },
        "metrics": metrics,
        "per_defect_type": per_type,
        "metric_definitions": METRIC_NOTES,
        "pixel_resolution": resolution,
        "at_training_threshold": at_threshold,
        "timings": {
            "fit_seconds": fit_seconds,
            "coreset_seconds": report.coreset_seconds,
            "embed_seconds": report.embed_seconds,
            "calibration_seconds": report.calibration_seconds,
            "backbone_load_seconds": backbone_seconds,
            "predict_seconds": predict_seconds,
            "predict_ms_per_image": 1000.0 * predict_seconds / len(paths),
            "metrics_seconds": metrics_seconds,
            "peak_rss_after_fit_mib": peak_after_fit,
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": (torch.cuda.max_memory_allocated(model.device) / (1 << 20)
                             if model.device.type == "cuda" else None),
            "notes": "fit = features + coreset + threshold calibration; predict = wall time to decode and score "
                     "the test set, divided by its size; peak RSS is the process peak so far (includes "
                     "earlier categories)",
        },
        "fit": {"n_patches": report.n_patches, "coreset_size": report.coreset_size,
                "features_spilled_to_disk": report.features_spilled_to_disk, "geometry": report.geometry},
        "partial": bool(test_failures or report.skipped),
        "failures": {"train_images": list(report.skipped), "test_images": test_failures},
        "notes": notes,
        "images": [{"file": item.path.relative_to(split.root).as_posix(), "defect_type": item.defect_type,
                    "label": item.label, "score": float(scores[i]),
                    "predicted_defect": None if predicted is None else bool(predicted[i])}
                   for i, item in enumerate(scored.items)],
    }
    if on_metrics is not None:
        on_metrics(record)  # written before the report is drawn: a failing report loses no metric
    if reports is not None:
        try:
            reports.append(_category_report(scored, model, scores, labels, maps, masks, metrics, per_type,
                                            pixel_curves, resolution, notes))
        except Exception as err:  # the metrics stand without their pictures
            logger.warning("report.html section of %s failed: %s", split.name, err, exc_info=True)
            record["notes"].append(f"the report.html section could not be drawn: {type(err).__name__}: {err}")
            if on_metrics is not None:
                on_metrics(record)
    return record


def _score_test_set(split: TestSet, model: PatchCore, progress: Progress):
    """Score every test image: (the split of the scored items, their scores (N,), their maps (one (h, w)
    float32 array each, at its model input size), the failures as text). An unreadable or unscorable image
    is a failure naming it; the rest are scored."""
    paths = [item.path for item in split.items]
    index = {path: i for i, path in enumerate(paths)}
    scores: dict[int, float] = {}
    maps: dict[int, np.ndarray] = {}
    failures: list[str] = []
    with progress(len(paths), f"{split.name} test") as bar:
        for batch in model.iter_predict(paths):
            failures += [str(err) for err in batch.failures]
            bar.update(len(batch.paths) + len(batch.failures))
            if batch.result is None:
                continue
            for k, path in enumerate(batch.paths):
                i = index[Path(path)]
                scores[i] = float(batch.result.scores[k])
                maps[i] = batch.result.maps[k].cpu().numpy().astype(np.float32, copy=False)
    kept = sorted(scores)
    if not kept:
        raise DatasetError(f"{split.name}: no test image could be scored: " + "; ".join(failures[:3]))
    scored = split if len(kept) == len(paths) else dataclasses.replace(split, items=[split.items[i] for i in kept])
    return scored, np.array([scores[i] for i in kept], dtype=np.float64), [maps[i] for i in kept], failures


# ---------------------------------------------------------------------------- reports
def write_atomic(path: Path, text: str) -> None:
    """Write then rename: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json(data: Any) -> str:
    return json.dumps(data, indent=1, allow_nan=False) + "\n"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarise(records: list[dict[str, Any]], requested: list[str],
              failed: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    keep = ("category", "layout", "n_images", "metrics", "pixel_resolution", "at_training_threshold", "timings",
            "notes")
    mean = {m: _mean([r["metrics"][m] for r in records]) for m in METRICS}
    return {
        "package_version": __version__,
        "settings": records[0]["settings"] if records else None,
        "device": records[0]["device"] if records else None,
        "categories_requested": requested,
        "categories_done": [r["category"] for r in records],
        "complete": [r["category"] for r in records] == requested,
        "categories_failed": list(failed or []),
        "partial": bool(failed) or any(r.get("partial") for r in records),
        "mean": {**mean,
                 "n_categories": {m: sum(r["metrics"][m] is not None for r in records) for m in METRICS},
                 "fit_seconds": _mean([r["timings"]["fit_seconds"] for r in records]),
                 "coreset_seconds": _mean([r["timings"]["coreset_seconds"] for r in records]),
                 "predict_ms_per_image": _mean([r["timings"]["predict_ms_per_image"] for r in records]),
                 "peak_rss_mib": max((r["timings"]["peak_rss_mib"] for r in records), default=None)},
        "metric_definitions": METRIC_NOTES,
        "categories": [{k: r[k] for k in keep} for r in records],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(summary: dict[str, Any]) -> str:
    settings = summary["settings"] or {}
    lines = ["# PatchCore evaluation", "",
             f"patchcore {summary['package_version']}; backbone {settings.get('backbone')}, coreset "
             f"{settings.get('coreset_size') or settings.get('coreset_ratio')}, resize {settings.get('resize')}, "
             f"crop {settings.get('crop')}; device {summary['device']}. Metrics in %.", "",
             "| category | image AUROC | pixel AUROC | AUPRO | image F1-max | pixel F1-max | fit s (coreset s) "
             "| predict ms/img | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name, metrics, fit, coreset, predict, rss):
        cells = [name] + [_pct(metrics[m]) for m in METRICS]
        cells += ["-" if fit is None else f"{fit:.1f} ({coreset:.1f})",
                  "-" if predict is None else f"{predict:.1f}", "-" if rss is None else f"{rss:.0f}"]
        return "| " + " | ".join(cells) + " |"

    for r in summary["categories"]:
        t = r["timings"]
        lines.append(row(r["category"], r["metrics"], t["fit_seconds"], t["coreset_seconds"],
                         t["predict_ms_per_image"], t["peak_rss_mib"]))
    mean = summary["mean"]
    if len(summary["categories"]) > 1:
        lines.append(row("**mean**", mean, mean["fit_seconds"], mean["coreset_seconds"],
                         mean["predict_ms_per_image"], mean["peak_rss_mib"]))
    partial = [m for m in METRICS if 0 < mean["n_categories"][m] < len(summary["categories"])]
    lines.append("")
    resolutions = list(dict.fromkeys(r["pixel_resolution"] for r in summary["categories"]))
    if len(resolutions) == 1:
        lines.append(f"Resolution: {resolutions[0]}.")
    else:
        lines += [f"Resolution, {r['category']}: {r['pixel_resolution']}." for r in summary["categories"]]
    lines += ["",
              f"AUPRO: per-region overlap integrated to FPR {AUPRO_FPR_LIMIT}, normalised. F1-max: best F1 over "
              "all thresholds on the test set (a protocol metric, not an operating point). Fit time includes "
              "threshold calibration; predict time includes image decoding. Peak RSS is the process peak so far."]
    if partial:
        lines.append(f"Mean of {', '.join(partial)} over the categories that have ground-truth masks only.")
    if not summary["complete"]:
        lines.append(f"Incomplete: {len(summary['categories_done'])} of {len(summary['categories_requested'])} "
                     "categories finished.")
    lines += [f"Failed: {f['category']}: {f['error']}" for f in summary["categories_failed"]]
    notes = [f"- {r['category']}: {note}" for r in summary["categories"] for note in r["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + notes
    lines += ["", "## At the model's own threshold (set from out-of-sample training scores; no test data used)", "",
              "| category | threshold | from train images | false alarms expected (90% interval) | false alarms "
              "observed | defects caught | precision | F1 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["categories"]:
        t = r["at_training_threshold"]
        if "threshold" not in t:
            lines.append(f"| {r['category']} | none | - | - | - | - | - | - |")
            continue
        low, high = t.get("expected_false_alarm_interval") or (None, None)
        expected = "-" if "expected_false_alarm_rate" not in t else \
            f"{_pct(t['expected_false_alarm_rate'])} ({_pct(low)}-{_pct(high)})"
        lines.append(f"| {r['category']} | {t['threshold']:.4g} | {t['n_held_out_train_images']} | {expected} | "
                     f"{_pct(t['observed_false_alarm_rate'])} | {_pct(t['recall'])} | {_pct(t['precision'])} | "
                     f"{_pct(t['f1'])} |")
    return "\n".join(lines) + "\n"


def write_results(output: Path, records: list[dict[str, Any]], requested: list[str],
                  failed: list[dict[str, Any]] | None = None) -> None:
    summary = summarise(records, requested, failed)
    write_atomic(output / "summary.json", _json(summary))
    write_atomic(output / "results.md", markdown(summary))


# ---------------------------------------------------------------------------- driver
@dataclass
class Evaluation:
    """What `evaluate` did: one record per category that finished, and the categories that failed."""

    records: list[dict[str, Any]]
    failed: list[dict[str, Any]]  # {"category", "error", "internal": True for an error that is a bug}

    @property
    def partial(self) -> bool:
        """A category failed, or one lost training or test images: the results do not cover all the data."""
        return bool(self.failed) or any(r["partial"] for r in self.records)


def evaluate(root: str | Path, config: PatchCoreConfig, output: str | Path, *, categories: list[str] | None = None,
             train: str | Path | None = None, device: str = "auto", max_feature_memory: int = 1 << 30,
             progress: Progress = no_progress, log=None, pixel_resolution: str = "original",
             report: bool = True) -> Evaluation:
    """Evaluate every category under `root` (or the named ones); write results as each one finishes.

    A category that fails (its error named in the log and in summary.json) does not stop the others; the
    metrics of each category are written before its report section is drawn.
    `report`: also write report.html (needs matplotlib: the `report` extra); without matplotlib the
    report is skipped with a note in the log, the metrics are written all the same."""
    log = log or (lambda text: None)
    folders = find_categories(root, categories)
    if train is not None and len(folders) > 1:
        raise DatasetError(f"--train applies to one category, but {len(folders)} were found under {root}; "
                           "name one with --category")
    splits = [load_split(folder, train=train) for folder in folders]  # all data errors before any fitting
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    requested = [s.name for s in splits]
    run = Evaluation([], [])
    sections: list | None = None
    if report:
        from .report import ReportUnavailableError, check_available, write_report

        try:
            check_available()
            sections = []
        except ReportUnavailableError as err:
            log(f"report.html skipped: {err}")
    for n, split in enumerate(splits, 1):
        step = f"[{n}/{len(splits)}] {split.name}"
        log(f"{step} ({split.layout} layout): fit on {len(split.train)} training images, score {len(split.items)} "
            "test images")

        def write_metrics(record: dict[str, Any], name: str = split.name) -> None:
            write_atomic(output / f"{name}.json", _json(record))

        try:
            record = evaluate_category(split, config, device=device, max_feature_memory=max_feature_memory,
                                       progress=progress, pixel_resolution=pixel_resolution, reports=sections,
                                       on_metrics=write_metrics)
        except PatchCoreError as err:  # this category's data or settings: named, and the next one goes on
            run.failed.append({"category": split.name, "error": str(err), "internal": False})
            log(f"{step}: failed: {err}")
            write_results(output, run.records, requested, run.failed)
            continue
        except Exception as err:  # a bug or the machine (out of memory): traceback in the log, then go on
            run.failed.append({"category": split.name, "error": f"{type(err).__name__}: {err}", "internal": True})
            log(f"{step}: failed with an internal error:\n{traceback.format_exc()}")
            write_results(output, run.records, requested, run.failed)
            continue
        run.records.append(record)
        write_results(output, run.records, requested, run.failed)
        if sections is not None:
            try:
                write_report(output / "report.html", sections)  # rewritten after each category, like the rest
            except Exception as err:  # the metrics are written; the pictures are a convenience
                log(f"{step}: report.html could not be written: {type(err).__name__}: {err}")
        m, t = record["metrics"], record["timings"]
        for note in record["notes"]:
            log(f"{step}: note: {note}")
        for failure in record["failures"]["test_images"]:
            log(f"{step}: test image not scored: {failure}")
        log(f"{step}: image AUROC {_pct(m['image_auroc'])}, pixel AUROC {_pct(m['pixel_auroc'])}, AUPRO "
            f"{_pct(m['aupro'])}; fit {t['fit_seconds']:.1f} s (coreset {t['coreset_seconds']:.1f} s), predict "
            f"{t['predict_ms_per_image']:.1f} ms/img, peak RSS {t['peak_rss_mib']:.0f} MiB")
        decisions = record["at_training_threshold"]
        if "threshold" in decisions:
            expected = decisions.get("expected_false_alarm_rate")
            log(f"{step}: at the model's threshold {decisions['threshold']:.4g}: false alarms expected "
                f"{_pct(expected)}% (target {_pct(decisions['target_false_alarm_rate'])}%), observed "
                f"{_pct(decisions['observed_false_alarm_rate'])}% of the test's good images; defects caught "
                f"{_pct(decisions['recall'])}%, F1 {_pct(decisions['f1'])}%")
    return run
