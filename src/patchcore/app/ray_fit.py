"""Fitting on Ray: one model with its feature extraction spread over tasks, or many models at once.

`RayPatchCore` is the estimator with one step replaced: the training features are extracted by Ray tasks,
chunk by chunk, each running the estimator's own extraction on its images. A task returns its chunk's
d*-dimensional projection to the driver and leaves the full features in the object store, where they were
computed (spilled to disk by Ray past its memory); the driver runs the coreset on the projection, as the
plain fit does, and fetches only the selected rows. Everything else is the plain `PatchCore.fit`: the same
geometry choice, calibration split, coreset, eq. 7 scale and thresholds, so the model file is byte-identical
to a single-process fit. (Chunks hold whole batches of config.batch_size files: each task walks its files
exactly as the single process does; with images of several sizes and unreadable files mixed in, a batch
can straddle two chunks and the bank's row order -- and so the file -- can differ.)

`fit_many_on_ray` fits one model per category folder as Ray tasks and writes a summary table.
"""
from __future__ import annotations

import csv
import io
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch

from ..config import PatchCoreConfig
from ..core.coreset import random_projection
from ..errors import InputError, PatchCoreError
from ..estimator import FitReport, PatchCore
from ..estimator.model import TrainingFeatures
from ..io.images import list_images
from ..io.model_file import atomic_write_bytes
from .ray_cluster import RaySession


class RemoteFeatures:
    """The training features of every chunk, left in Ray's object store: the FeatureStore interface the
    fit uses (`rows`, `spilled`, `gather`, `close`), with the rows fetched from where they were computed."""

    spilled = False  # the object store spills by itself; the driver never holds the features

    def __init__(self, refs: list, counts: list[int], dim: int):
        self.refs, self.dim = refs, dim
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rows = int(self.offsets[-1])
        self._cached: tuple[int, np.ndarray] | None = None  # one chunk's rows, for image-by-image reads

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows at `indices` (any order) -> (len(indices), D) float32. Rows of several chunks (the bank's):
        one task per chunk picks them where they are; rows of one chunk (one training image's, for the
        out-of-fold thresholds, image after image): that chunk is fetched once and kept until another is."""
        index = indices.cpu().numpy().astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.rows):
            raise IndexError("feature index out of range")
        chunk_of = np.searchsorted(self.offsets, index, side="right") - 1
        chunks = np.unique(chunk_of)
        out = np.empty((index.size, self.dim), dtype=np.float32)
        if len(chunks) == 1:
            chunk = int(chunks[0])
            if self._cached is None or self._cached[0] != chunk:
                self._cached = (chunk, ray.get(self.refs[chunk]))
            out[:] = self._cached[1][index - self.offsets[chunk]]
            return torch.from_numpy(out)
        pending = []
        for chunk in chunks:
            at = np.flatnonzero(chunk_of == chunk)
            pending.append((at, _take_rows.remote(self.refs[chunk], index[at] - self.offsets[chunk])))
        for at, ref in pending:
            out[at] = ray.get(ref)
        return torch.from_numpy(out)

    def close(self) -> None:
        self.refs, self._cached = [], None  # dropping the references frees the object store


@ray.remote(num_returns=3, max_retries=3)
def _extract_chunk(config: PatchCoreConfig, device: str, threads: int | None, images: list, region,
                   max_feature_memory: int):
    """One chunk of training images -> (meta, projected (n, d*), features (n, D)) with the estimator's own
    extraction; the projection is drawn from a generator seeded as fit's, so it is fit's projection."""
    if threads:
        torch.set_num_threads(threads)
    model = PatchCore(config, device=device)
    report = FitReport()
    generator = torch.Generator().manual_seed(config.seed)
    try:
        training = model._extract_training_features(images, region, report, generator, None, max_feature_memory, None)
    except InputError:
        if report.n_images == 0 and report.skipped:  # every file of this chunk unreadable: an empty chunk
            meta = {"n_images": 0, "skipped": report.skipped, "grid": (0, 0), "input_size": (0, 0), "dim": 0,
                    "images": []}
            return meta, np.zeros((0, config.projection_dim), np.float32), np.zeros((0, 0), np.float32)
        raise
    try:
        features = training.store.gather(torch.arange(training.store.rows)).numpy()
    finally:
        training.store.close()
    # where each image's rows sit in this chunk (the driver shifts them by the chunk's first row)
    meta = {"n_images": report.n_images, "skipped": report.skipped, "grid": training.grid,
            "input_size": training.input_size, "dim": features.shape[1], "images": training.images}
    return meta, training.projected.numpy(), features


@ray.remote(max_retries=3)
def _take_rows(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return features[rows]


class RayPatchCore(PatchCore):
    """PatchCore whose fit extracts the training features in Ray tasks (the module doc). Call `fit` inside
    a RaySession; the fitted model saves, loads and predicts as any PatchCore."""

    def __init__(self, config: PatchCoreConfig | None = None, *, device: str | torch.device = "auto",
                 chunk_images: int | None = None, task_threads: int | None = None):
        super().__init__(config, device=device)
        # CPU kernels' results depend on their thread count (EfficientNet-Lite0 features differ in the last
        # bits between 1 and 2 threads): tasks use the driver's, so the file equals this machine's plain fit.
        self.chunk_images, self.task_threads = chunk_images, task_threads or torch.get_num_threads()

    def _chunks(self, images: list) -> list[list]:
        """Whole batches of config.batch_size per chunk, about two chunks per task the cluster runs at once."""
        batch = self.config.batch_size
        tasks_at_once = max(1, RaySession.cluster_cpus() // self.task_threads)
        per = self.chunk_images or -(-len(images) // (2 * tasks_at_once))
        per = max(batch, -(-per // batch) * batch)
        return [images[i:i + per] for i in range(0, len(images), per)]

    def _extract_training_features(self, images: list, region, report: FitReport, generator: torch.Generator,
                                   progress, max_feature_memory: int, spill_dir):
        cfg = self.config
        device = "cuda" if self.device.type == "cuda" else "cpu"
        # Booked as used (no oversubscription), but never more than the largest node has (it would never run).
        extract = _extract_chunk.options(num_cpus=min(self.task_threads, RaySession.largest_node_cpus()))
        calls = [extract.remote(cfg, device, self.task_threads, chunk, region, max_feature_memory)
                 for chunk in self._chunks(images)]
        metas = [call[0] for call in calls]
        projections = [call[1] for call in calls]
        feature_refs, counts, projected_parts, placed = [], [], [], []
        grid = input_size = (0, 0)
        dim = 0
        for meta_ref, projected_ref, features_ref in zip(metas, projections, (c[2] for c in calls)):
            meta = ray.get(meta_ref)
            report.skipped += meta["skipped"]
            report.n_images += meta["n_images"]
            if progress is not None:
                progress(meta["n_images"] + len(meta["skipped"]))
            if meta["n_images"] == 0:
                continue
            grid = tuple(max(a, b) for a, b in zip(grid, meta["grid"]))
            input_size = tuple(max(a, b) for a, b in zip(input_size, meta["input_size"]))
            dim = meta["dim"]
            projected_parts.append(ray.get(projected_ref))  # (n, d*): the driver's share, as in the plain fit
            feature_refs.append(features_ref)
            first_row = sum(counts)
            placed += [_shifted(image, first_row, len(placed)) for image in meta["images"]]
            counts.append(projected_parts[-1].shape[0])
        if not feature_refs:
            raise InputError("no readable training image: " + "; ".join(report.skipped[:5]))
        projected = torch.from_numpy(np.concatenate(projected_parts))
        if projected.shape[0] == 0:
            raise InputError(f"{cfg.region}: the inspection region covers no patch of the training images")
        random_projection(dim, cfg.projection_dim, generator)  # the draw the plain fit makes: same generator state
        return TrainingFeatures(RemoteFeatures(feature_refs, counts, dim), projected, grid, input_size, placed)


def _shifted(image, first_row: int, images_before: int):
    """A chunk's record of where a training image's rows sit -> the same in the whole set's row numbers (and
    an in-memory image's '#k' name counted over the whole set, as the single-process fit names it)."""
    name = f"#{images_before + int(image.name[1:])}" if image.name.startswith("#") else image.name
    return replace(image, name=name, pieces=tuple((start + first_row, *rest) for start, *rest in image.pieces))


# ---------------------------------------------------------------------------- many models
def category_folders(root: Path) -> dict[str, Path]:
    """name -> training folder: each subfolder of `root` with images in <name>/train/good (MVTec) or in
    <name> itself."""
    found = {}
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        train = folder / "train" / "good"
        train = train if train.is_dir() else folder
        if list_images(train):
            found[folder.name] = train
    if not found:
        raise InputError(f"{root}: no category folder with images (<name>/train/good or <name>/*.png)")
    return found


@ray.remote(max_retries=1)
def _fit_one(config: PatchCoreConfig, name: str, train: str, output: str, device: str, threads: int | None) -> dict:
    """One category's plain fit and save, as a Ray task -> its summary row (an error row, not an exception)."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    row = {"category": name, "train": train, "model": output, "status": "failed", "images": 0, "patches": 0,
           "bank": 0, "image_threshold": None, "pixel_threshold": None, "skipped": 0, "seconds": 0.0, "error": ""}
    try:
        model = PatchCore(config, device=device).fit(list_images(Path(train)))
        model.save(output)
        report = model.fit_report_
        row.update(status="fitted", images=report.n_images, patches=report.n_patches,
                   bank=int(model.memory_bank_.shape[0]), image_threshold=model.image_threshold_,
                   pixel_threshold=model.pixel_threshold_, skipped=len(report.skipped))
    except PatchCoreError as err:
        row["error"] = str(err)
    except Exception as err:  # a bug or the machine: the row says so; the other fits go on
        row["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}"
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row


SUMMARY_FIELDS = ["category", "status", "images", "patches", "bank", "image_threshold", "pixel_threshold", "skipped",
                  "seconds", "model", "error"]


def fit_many_on_ray(root: str | Path, output: str | Path, config: PatchCoreConfig, *, device: str = "cpu",
                    categories: list[str] | None = None, threads: int | None = 1,
                    on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One model per category folder of `root` -> OUTPUT/<category>.model, fitted as Ray tasks (call inside
    a RaySession); OUTPUT/summary.csv, summary.md and summary.json list what was fitted and what failed."""
    output = Path(output)
    found = category_folders(Path(root))
    if categories:
        unknown = sorted(set(categories) - set(found))
        if unknown:
            raise InputError(f"{root}: no category folder {', '.join(unknown)} (found: {', '.join(found)})")
        found = {k: v for k, v in found.items() if k in categories}
    output.mkdir(parents=True, exist_ok=True)
    calls = {name: _fit_one.options(num_cpus=threads or 1).remote(
        replace(config), name, str(train), str(output / f"{name}.model"), device, threads)
        for name, train in found.items()}
    rows, pending = [], {ref: name for name, ref in calls.items()}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        try:
            row = ray.get(ready[0])
        except ray.exceptions.RayError as err:  # the task's process or node died past its retries
            row = {"category": name, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    rows.sort(key=lambda r: r["category"])
    write_summary(output, rows)
    return rows


def write_summary(output: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(output / "summary.csv", text.getvalue().encode())
    atomic_write_bytes(output / "summary.json", json.dumps(rows, indent=1).encode())
    atomic_write_bytes(output / "summary.md", summary_table(rows).encode())


def summary_table(rows: list[dict]) -> str:
    lines = ["| category | status | images | bank | image threshold | seconds | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        threshold = "" if r.get("image_threshold") is None else f"{r['image_threshold']:.4g}"
        error = str(r.get("error", "")).splitlines()[0] if r.get("error") else ""
        lines.append(f"| {r['category']} | {r['status']} | {r.get('images', '')} | {r.get('bank', '')} | "
                     f"{threshold} | {r.get('seconds', '')} | {error} |")
    fitted = sum(r["status"] == "fitted" for r in rows)
    return "\n".join(lines) + f"\n\n{fitted} of {len(rows)} models fitted\n"
