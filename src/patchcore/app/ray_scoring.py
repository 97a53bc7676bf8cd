"""What a Ray actor runs for `predict --ray` (app/ray_predict.py is the driver): hold one scoring backend, score a
chunk of images, write the chunk's Parquet part whole or not at all.

This module imports neither torch nor the estimator: an actor on the lean runtime (`runtime_backend`) is a
process of numpy, onnxruntime or OpenVINO, Pillow and pyarrow, as `patchcore-score` is, and skips the 2.5-8 s
a fresh process spent importing torch (and, through the backbone, timm, torchvision and torch._dynamo), a
fixed cost of every job (docs/CLUSTER.md). The torch backends (the estimator, a single model or an ensemble,
and the exported graph behind the estimator's API) live in app/ray_torch_backends.py, imported only by the
actors that use them.

A backend: `score(images)` maps decoded uint8 (H, W, 3) arrays to one (score, map, label, mask) or an error
text each; `score_files(paths)` decodes and scores files, each as the single-process command does;
`image_threshold` and `pixel_threshold`; and `write_pictures(...)` where it can draw (the torch backends).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ImageReadError, InputError, OutputError
from ..io.images import read_image
from ..runtime import Runtime
from ..runtime.bundle import default_export_dir
from .ray_cluster import file_sha256

SCHEMA = pa.schema([("path", pa.string()), ("name", pa.string()), ("score", pa.float64()), ("label", pa.string()),
                    ("image_threshold", pa.float64()), ("pixel_threshold", pa.float64()),
                    ("model_sha256", pa.string()), ("error", pa.string())])


# ---------------------------------------------------------------------------- the lean runtime's backend
class RuntimeBackend:
    """patchcore.runtime (exported graph + the model file's bank), no torch: the scores of `patchcore-score` and
    of `Runtime.iter_predict` on the same files, bit for bit (the same code). Draws no pictures."""

    def __init__(self, runtime: Runtime, *, image_threshold: float | None, pixel_threshold: float | None):
        self.runtime = runtime.with_thresholds(image=image_threshold, pixel=pixel_threshold)

    @property
    def image_threshold(self) -> float | None:
        return self.runtime.state_.image_threshold

    @property
    def pixel_threshold(self) -> float | None:
        return self.runtime.state_.pixel_threshold

    def score(self, images: list[np.ndarray]) -> list[tuple | str]:
        return score_or_name_refusals(lambda some: _per_image(self.runtime.predict(some)), images)

    def score_files(self, paths: list[str]) -> list[tuple]:
        """(image, result or error text) per path, in order: `Runtime.iter_predict` (files decoded in background
        threads while the graph scores; unreadable and unscorable files reported per file)."""
        found: dict[str, tuple] = {}  # by str(Path(path)): iter_predict gives the paths back as Path objects
        for batch in self.runtime.iter_predict(paths):
            found.update({str(Path(f.path)): (None, f.reason) for f in batch.failures})
            if batch.result is not None:
                found.update({str(p): (image, result) for p, image, result
                              in zip(batch.paths, batch.images, _per_image(batch.result))})
        return [found.get(str(Path(p)), (None, "not scored")) for p in paths]


def runtime_backend(model_path: str, *, device: str, threads: int | None, export_dir: str | None = None,
                    engine: str = "onnxruntime", precision: str = "fp32", **options) -> RuntimeBackend:
    """The lean runtime on `engine` (onnxruntime, onnxruntime-cuda, openvino); the export folder defaults to
    MODEL.onnx/, as `patchcore export` writes it."""
    if device == "cuda" and engine == "onnxruntime":
        engine = "onnxruntime-cuda"
    export = Path(export_dir) if export_dir else default_export_dir(model_path)
    return RuntimeBackend(Runtime.load(model_path, export, backend=engine, threads=threads, precision=precision),
                          **options)


def score_or_name_refusals(score: Callable[[list], list], images: list) -> list:
    """score(images) -> one result per image; where the model refuses the batch (InputError: a size, an aspect
    it cannot take), each image alone, so that only the refused ones become error texts."""
    try:
        return score(images)
    except InputError as err:
        if len(images) == 1:
            return [f"cannot be scored: {err}"]
        return [result for image in images for result in score_or_name_refusals(score, [image])]


def _per_image(result) -> list[tuple]:
    """A RuntimeResult -> one (score, map, label, mask) per image (maps may be a list: images of different
    model-input sizes)."""
    n = result.scores.shape[0]
    labels = [None] * n if result.labels is None else [bool(v) for v in result.labels.tolist()]
    masks = [None] * n if result.masks is None else list(result.masks)
    return list(zip(result.scores.tolist(), list(result.maps), labels, masks))


# ---------------------------------------------------------------------------- the pipeline stages
def decode_chunk(row: dict) -> dict:
    """Ray Data task: a chunk's files -> decoded uint8 (H, W, 3) arrays, or an error text per file."""
    images, errors = [], []
    for path in row["paths"]:
        try:
            images.append(read_image(path))
            errors.append("")
        except ImageReadError as err:
            images.append(None)
            errors.append(err.reason)
    return {**row, "images": images, "errors": errors}


class ChunkScorer:
    """Ray Data actor: holds one backend (the model, loaded once) and writes one Parquet part per chunk."""

    def __init__(self, *, model_path: str, model_sha256: str, output: str, backend: Callable, backend_options: dict,
                 device: str, threads: int | None, image_threshold: float | None, pixel_threshold: float | None,
                 pictures: bool, save_maps: bool, full_resolution: bool):
        """backend: the function that loads the backend (`runtime_backend` here, or one of
        app/ray_torch_backends.py): Ray sends it by reference, so an actor imports only its module."""
        if file_sha256(model_path) != model_sha256:  # the file changed since the job started: not this job
            raise OutputError(f"{model_path}: the model file changed since this job started")
        self.backend = backend(model_path, device=device, threads=threads, image_threshold=image_threshold,
                               pixel_threshold=pixel_threshold, **backend_options)
        self.model_sha256, self.output = model_sha256, Path(output)
        self.pictures, self.save_maps, self.full_resolution = pictures, save_maps, full_resolution

    def __call__(self, batch: dict) -> dict:
        out = {"part": [], "n": [], "n_failed": []}
        for i in range(len(batch["chunk"])):
            paths, names = list(batch["paths"][i]), list(batch["names"][i])
            if "images" in batch:  # decoded by the pipeline's tasks
                rows = self.score_chunk(paths, names, list(batch["images"][i]), list(batch["errors"][i]))
            else:  # decoded here, in the actor's threads
                rows = self.score_decoded(paths, names, self.backend.score_files(paths))
            name = f"part-{int(batch['run'][i]):04d}-{int(batch['chunk'][i]):07d}.parquet"
            write_part(self.output / "scores" / name, rows)
            out["part"].append(name)
            out["n"].append(len(rows))
            out["n_failed"].append(sum(r["error"] is not None for r in rows))
        return {k: np.array(v) for k, v in out.items()}

    def score_chunk(self, paths: list[str], names: list[str], images: list, errors: list[str]) -> list[dict]:
        rows: list[dict | None] = [None] * len(paths)
        kept, arrays = [], []
        for i, (image, error) in enumerate(zip(images, errors)):
            if error:
                rows[i] = self._row(paths[i], names[i], error=error)
            else:
                kept.append(i)
                arrays.append(np.ascontiguousarray(image))
        results = self.backend.score(arrays) if arrays else []
        scored = self.score_decoded([paths[i] for i in kept], [names[i] for i in kept], list(zip(arrays, results)))
        for i, row in zip(kept, scored):
            rows[i] = row
        return rows

    def score_decoded(self, paths: list[str], names: list[str], scored: list[tuple]) -> list[dict]:
        """(image, result or error text) per path -> the rows (and the pictures, when asked)."""
        rows: list[dict | None] = [None] * len(paths)
        for i, (image, result) in enumerate(scored):
            if isinstance(result, str):
                rows[i] = self._row(paths[i], names[i], error=result)
                continue
            score, label = result[0], result[2]
            if self.pictures:  # the single-process writer's own function: the same files
                written = self.backend.write_pictures(self.output, names[i], Path(paths[i]), image, result,
                                                      self.save_maps, self.full_resolution)
                if "error" in written:
                    rows[i] = self._row(paths[i], names[i], error=written["error"])
                    continue
            elif not math.isfinite(score):
                rows[i] = self._row(paths[i], names[i], error=f"the model gave a non-finite anomaly score ({score})")
                continue
            rows[i] = self._row(paths[i], names[i], score=score,
                                label=None if label is None else ("defect" if label else "good"))
        return rows

    def _row(self, path: str, name: str, *, score: float | None = None, label: str | None = None,
             error: str | None = None) -> dict:
        return {"path": path, "name": name, "score": score, "label": label,
                "image_threshold": self.backend.image_threshold, "pixel_threshold": self.backend.pixel_threshold,
                "model_sha256": self.model_sha256, "error": error}


def write_part(path: Path, rows: list[dict]) -> None:
    """One chunk's rows -> a Parquet file, whole or not at all (temporary name, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
