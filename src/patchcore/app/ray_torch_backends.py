"""The torch scoring backends of a `predict --ray` actor (app/ray_scoring.py): the estimator ("torch": a single
model or an ensemble) and the exported graph behind the estimator's API ("onnx", as `predict --runtime onnx`).
Only the public estimator API and the single-process writer are used, so the scores and pictures are those of
`patchcore predict` with the same backend. Imported only by the actors that score with them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..estimator.ensemble import load_model
from .predict_folder import _scored_batches, _split, _write_outputs
from .ray_scoring import score_or_name_refusals


class EstimatorBackend:
    """A PatchCore (or ensemble) loaded once; the backend interface of app/ray_scoring.py, drawing pictures too."""

    def __init__(self, model, *, image_threshold: float | None, pixel_threshold: float | None):
        self.model = model
        self.model.with_thresholds(image=image_threshold, pixel=pixel_threshold)

    @property
    def image_threshold(self) -> float | None:
        return self.model.image_threshold_

    @property
    def pixel_threshold(self) -> float | None:
        return self.model.pixel_threshold_

    def score(self, images: list[np.ndarray]) -> list[tuple | str]:
        return score_or_name_refusals(lambda some: _split(self.model.predict(some)), [_tensor(i) for i in images])

    def score_files(self, paths: list[str]) -> list[tuple]:
        """Decode and score files -> one (image, result or error text) per path, in order: the single-process
        writer's own loop (iter_predict, background decoding threads, its per-file checks and retries)."""
        found: dict[str, tuple] = {}
        for batch_paths, images, results, failures in _scored_batches(self.model, [Path(p) for p in paths]):
            found.update({str(p): (image, result) for p, image, result in zip(batch_paths, images, results)})
            found.update({str(Path(f.path)): (None, f.reason) for f in failures})
        return [found.get(str(Path(p)), (None, "not scored")) for p in paths]

    def write_pictures(self, output: Path, name: str, path: Path, image, result: tuple, save_maps: bool,
                       full_resolution: bool) -> dict:
        """Heatmap, overlay, mask (and map) of one image: `patchcore predict`'s own writer, the same files."""
        return _write_outputs(output, self.model, name, path, _tensor(image), [result], 0, save_maps,
                              full_resolution)


def _tensor(image) -> torch.Tensor:
    """A decoded (H, W, 3) uint8 array -> the (3, H, W) tensor the estimator takes (tensors pass through)."""
    return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def torch_backend(model_path: str, *, device: str, threads: int | None, **options) -> EstimatorBackend:
    """The torch estimator (a single model or an ensemble), as `patchcore predict`."""
    if threads:
        torch.set_num_threads(threads)
    return EstimatorBackend(load_model(model_path, device=device), **options)


def onnx_backend(model_path: str, *, device: str, threads: int | None, export_dir: str | None = None,
                 engine: str = "onnxruntime", precision: str = "fp32", **options) -> EstimatorBackend:
    """The lean runtime's exported graph behind the estimator (`patchcore predict --runtime onnx`): the embedding
    runs in the graph, the rest is the library's; draws pictures as the torch path does."""
    from ..estimator.exported import ExportedPatchCore

    if threads:
        torch.set_num_threads(threads)
    model = ExportedPatchCore.load(model_path, export_dir=export_dir, backend=engine, threads=threads,
                                   precision=precision)
    return EstimatorBackend(model, **options)
