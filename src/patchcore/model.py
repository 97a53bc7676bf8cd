"""The PatchCore estimator: fit on nominal images, score new ones (sklearn-style: state ends in `_`)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from . import __version__
from .backbones import Backbone, build_backbone
from .config import PatchCoreConfig
from .coreset import coreset_count, greedy_coreset, random_projection
from .feature_store import FeatureStore
from .features import level_dims, level_reductions, patch_embeddings
from .images import ImageReadError, LoadedBatch, Preprocess, as_uint8_tensor, iter_image_batches
from .bank_index import BankIndex
from .knn import squared_norms
from .model_file import ModelFileError, read_model_file, write_model_file
from .scoring import anomaly_maps, reweighted_image_scores, typical_nn_distance

log = logging.getLogger("patchcore")

ImageInput = str | Path | np.ndarray | Image.Image | torch.Tensor
DEFAULT_MAX_FEATURE_MEMORY = 1 << 30  # bytes of full-dimensional training features kept in RAM


class NotFittedError(RuntimeError):
    pass


class PatchCoreResult(NamedTuple):
    """What `predict` returns, always the same fields.

    scores: (N,) image anomaly scores (paper eq. 7). maps: (N, H, W) pixel scores at the model's input
    geometry (after resize and crop). labels / masks: True = defect, by the thresholds calibrated on
    held-out training images; None when the model has no calibrated threshold.
    """

    scores: torch.Tensor
    maps: torch.Tensor
    labels: torch.Tensor | None
    masks: torch.Tensor | None


@dataclass
class PredictedBatch:
    """One batch from `iter_predict`: the scored files, their result, the files that failed to read,
    and the decoded images (uint8 (3, H, W), for drawing overlays without decoding twice)."""

    paths: list[Path]
    result: PatchCoreResult | None
    failures: list[ImageReadError]
    images: list[torch.Tensor]


@dataclass
class FitReport:
    """Where fit time went; kept on the model as `fit_report_` (not saved)."""

    n_images: int = 0
    n_calibration_images: int = 0
    n_patches: int = 0
    coreset_size: int = 0
    embed_seconds: float = 0.0
    coreset_seconds: float = 0.0
    calibration_seconds: float = 0.0
    features_spilled_to_disk: bool = False
    skipped: list[str] = field(default_factory=list)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return device


class PatchCore:
    """PatchCore (Roth et al., CVPR 2022).

    >>> model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0")).fit(train_paths)
    >>> result = model.predict(test_paths)   # PatchCoreResult(scores, maps, labels, masks)
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, device: str | torch.device = "auto"):
        self.config = config or PatchCoreConfig()
        self.device = resolve_device(device)
        self._backbone: Backbone | None = None
        self._preprocess: Preprocess | None = None
        self._pooling: list[torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ feature extraction
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            cfg = self.config
            backbone, spec = build_backbone(cfg.backbone, cfg.feature_strides, weights=cfg.weights, seed=cfg.seed)
            self._backbone = backbone.to(self.device)  # keeps the channels-last layout Backbone chose
            self._preprocess = Preprocess(cfg.resize, cfg.crop, spec.mean, spec.std)
            self._pooling = [r.to(self.device) if isinstance(r, torch.Tensor) else r
                             for r in level_reductions(backbone.channels, cfg.embedding_dim)]
        return self._backbone

    @property
    def preprocess(self) -> Preprocess:
        _ = self.backbone
        return self._preprocess

    @property
    def embedding_dim(self) -> int:
        return sum(level_dims(self.backbone.channels, self.config.embedding_dim))

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """uint8 (B, 3, H, W) -> patch features (B, h*w, D), grid (h, w), input size (H', W')."""
        backbone = self.backbone
        x = self.preprocess(images.to(self.device, non_blocking=True))
        feature_maps = backbone(x)  # Backbone.forward makes the input channels-last on every device
        grid = tuple(feature_maps[0].shape[-2:])
        return patch_embeddings(feature_maps, self._pooling, self.config.patch_size), grid, tuple(x.shape[-2:])

    # ------------------------------------------------------------------ fit
    def fit(self, images: Sequence[ImageInput], *, progress: Callable[[int], None] | None = None,
            max_feature_memory: int = DEFAULT_MAX_FEATURE_MEMORY, spill_dir: str | Path | None = None) -> "PatchCore":
        """Build the coreset memory bank from nominal images (paths, arrays, PIL images or tensors).

        A share of the images (config.calibration_ratio) is held out from the bank and scored to set
        the decision thresholds. Unreadable files are skipped with a warning naming each
        (`fit_report_.skipped`); no readable image at all is an error.
        """
        cfg = self.config
        images = list(images)
        if not images:
            raise ValueError("fit needs at least one image")
        fit_images, calibration_images = _calibration_split(images, cfg.calibration_ratio, cfg.seed)
        report = FitReport(n_calibration_images=len(calibration_images))
        generator = torch.Generator().manual_seed(cfg.seed)
        projection = None
        projected = None  # (N, d*) float32, allocated once: no list + cat doubling for large sets
        rows_done = 0
        started = time.perf_counter()
        store = None
        try:
            for batch in _batches(fit_images, cfg.batch_size):
                report.skipped += [str(err) for err in batch.failures]
                for err in batch.failures:
                    log.warning("skipped training image %s", err)
                if progress is not None:
                    progress(len(batch.images) + len(batch.failures))
                for stacked in _same_size_stacks(batch.images):
                    features, grid, input_size = self.embed(stacked)
                    rows = features.flatten(0, 1)
                    if store is None:
                        store = FeatureStore(rows.shape[1], max_memory_bytes=max_feature_memory, spill_dir=spill_dir)
                        # psi: the seeded JL map for the coreset search (section 2).
                        projection = random_projection(rows.shape[1], cfg.projection_dim, generator).to(self.device)
                        self.grid_, self.input_size_ = grid, input_size
                        projected = torch.empty(len(fit_images) * features.shape[1], cfg.projection_dim)
                    elif grid != self.grid_:
                        raise ValueError(f"all training images must give the same feature grid; got {grid} "
                                         f"and {self.grid_} (set a fixed --resize H,W or a --crop)")
                    projected[rows_done:rows_done + rows.shape[0]] = (rows @ projection).cpu()
                    rows_done += rows.shape[0]
                    store.append(rows)
                    report.n_images += stacked.shape[0]
            if store is None:
                raise ValueError("no readable training image: " + "; ".join(report.skipped[:5]))
            report.embed_seconds = time.perf_counter() - started

            started = time.perf_counter()
            projected_all = projected[:rows_done]  # a view: skipped files leave the tail unused
            del projected
            projected_all -= projected_all.mean(0)  # k-center is translation invariant; see greedy_coreset
            report.n_patches = projected_all.shape[0]
            n = coreset_count(report.n_patches, cfg.coreset_ratio, cfg.coreset_size)
            selected = greedy_coreset(projected_all.to(self.device), n, generator=generator).cpu()
            del projected_all
            # Sorted: bank order follows the training data, so the file is independent of selection order.
            self.memory_bank_ = store.gather(selected.sort().values).to(self.device)
            report.coreset_size = n
            report.features_spilled_to_disk = store.spilled
            report.coreset_seconds = time.perf_counter() - started
        finally:
            if store is not None:
                store.close()
        self._bank_sq_norms = squared_norms(self.memory_bank_)
        self.distance_scale_ = typical_nn_distance(self.memory_bank_, self._bank_sq_norms, generator=generator)
        self.weights_sha256_ = self.backbone.weights_sha256
        self.n_train_images_ = report.n_images
        self.n_train_patches_ = report.n_patches

        started = time.perf_counter()
        self.calibration_scores_: list[float] = []
        self.image_threshold_ = self.pixel_threshold_ = None
        if calibration_images:
            scores, pixel_max = [], []
            for batch in _batches(calibration_images, cfg.batch_size):
                report.skipped += [str(err) for err in batch.failures]
                for stacked in _same_size_stacks(batch.images):
                    result = self._score_uint8(stacked)
                    scores += result.scores.tolist()
                    pixel_max += result.maps.flatten(1).amax(1).tolist()
            if scores:
                self.calibration_scores_ = [float(s) for s in scores]
                self.image_threshold_ = nominal_threshold(scores)
                self.pixel_threshold_ = nominal_threshold(pixel_max)
        report.calibration_seconds = time.perf_counter() - started
        self.fit_report_ = report
        return self

    # ------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError("this PatchCore model is not fitted yet: call fit() or PatchCore.load()")

    @property
    def bank_index(self) -> BankIndex:
        """The search structure over memory_bank_, built on first use (derived state: never saved)."""
        index = getattr(self, "_index", None)
        if index is None or index.bank_.data_ptr() != self.memory_bank_.data_ptr():
            self._index = index = BankIndex(self.memory_bank_)
        return index

    @torch.inference_mode()
    def _score_uint8(self, images: torch.Tensor) -> PatchCoreResult:
        """uint8 (B, 3, H, W), all the same size -> scores (B,), maps (B, H', W'), labels, masks."""
        features, grid, input_size = self.embed(images)
        batch, patches, dim = features.shape
        if dim != self.memory_bank_.shape[1]:
            raise ModelFileError(f"feature size {dim} does not match the memory bank's {self.memory_bank_.shape[1]}")
        dist, idx = self.bank_index.search(features.reshape(-1, dim))  # exact 1-NN of every patch
        patch_dist, patch_idx = dist.view(batch, patches), idx.view(batch, patches)
        scores = reweighted_image_scores(features, patch_dist, patch_idx, self.memory_bank_, self._bank_sq_norms,
                                         self.config.reweight_neighbours, self.distance_scale_)
        maps = anomaly_maps(patch_dist, grid, input_size, self.config.blur_sigma)
        labels = masks = None
        if self.image_threshold_ is not None:
            labels = scores > self.image_threshold_
            masks = maps > self.pixel_threshold_
        return PatchCoreResult(scores, maps, labels, masks)

    def predict_batch(self, images: torch.Tensor) -> PatchCoreResult:
        """Score one uint8 (B, 3, H, W) batch in a single pass (the serving path; tensors may be on the GPU)."""
        self._check_fitted()
        return self._score_uint8(images)

    def predict(self, images: Sequence[ImageInput] | torch.Tensor) -> PatchCoreResult:
        """Score images (paths, arrays, PIL images, or a uint8 (B, 3, H, W) tensor, which may already be
        on the model's device). An unreadable file raises ImageReadError naming it; the CLI instead
        reports such files and goes on."""
        self._check_fitted()
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            parts = [self._score_uint8(images[i:i + self.config.batch_size])
                     for i in range(0, images.shape[0], self.config.batch_size)]
            return _concat_results(parts)
        parts = []
        for batch in _batches(list(images), self.config.batch_size):
            if batch.failures:
                raise batch.failures[0]
            parts += [self._score_uint8(stacked) for stacked in _same_size_stacks(batch.images)]
        return _concat_results(parts)

    def iter_predict(self, paths: Sequence[str | Path]) -> Iterator[PredictedBatch]:
        """Stream batches: unreadable files are reported in `failures`, the rest scored (order kept)."""
        self._check_fitted()
        for batch in iter_image_batches(paths, self.config.batch_size):
            parts = [self._score_uint8(stacked) for stacked in _same_size_stacks(batch.images)]
            yield PredictedBatch(batch.paths, _concat_results(parts) if parts else None, batch.failures, batch.images)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the model atomically: bank as safetensors, everything else as JSON (no pickle)."""
        self._check_fitted()
        write_model_file(path, {"memory_bank": self.memory_bank_.float()}, self._metadata())

    def _metadata(self) -> dict[str, Any]:
        return {
            "package_version": __version__,
            "config": self.config.to_dict(),
            "backbone": self.config.backbone,
            "backbone_weights_sha256": self.weights_sha256_,
            "fitted": {
                "distance_scale": self.distance_scale_,
                "image_threshold": self.image_threshold_,
                "pixel_threshold": self.pixel_threshold_,
                "calibration_scores": self.calibration_scores_,
                "grid": list(self.grid_),
                "input_size": list(self.input_size_),
                "n_train_images": self.n_train_images_,
                "n_train_patches": self.n_train_patches_,
            },
        }

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto", weights: str | None = None) -> "PatchCore":
        """Rebuild a saved model. `weights` points at a local copy of the backbone weights when the
        path recorded at fit time does not exist here; they must hash to what the model was fitted with."""
        tensors, header = read_model_file(path)
        try:
            saved = dict(header["config"])
            if weights is not None:
                saved["weights"] = weights
            config = PatchCoreConfig.from_dict(saved)
            fitted = header["fitted"]
            bank = tensors["memory_bank"]
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(f"{path}: incomplete or invalid model file ({err})") from None
        model = cls(config, device=device)
        if model.backbone.weights_sha256 != header.get("backbone_weights_sha256"):
            raise ModelFileError(
                f"{path}: the backbone weights found here for {config.backbone} are not the ones this model was "
                f"fitted with (sha256 {model.backbone.weights_sha256[:12]}... here, "
                f"{str(header.get('backbone_weights_sha256'))[:12]}... in the file); pass the original weights file")
        if bank.ndim != 2 or bank.shape[1] != model.embedding_dim:
            raise ModelFileError(f"{path}: memory bank of shape {tuple(bank.shape)} does not fit backbone "
                                 f"{config.backbone} with embedding size {model.embedding_dim}")
        model.memory_bank_ = bank.to(model.device)
        model._bank_sq_norms = squared_norms(model.memory_bank_)
        model.weights_sha256_ = header["backbone_weights_sha256"]
        model.distance_scale_ = float(fitted["distance_scale"])
        model.image_threshold_ = fitted.get("image_threshold")
        model.pixel_threshold_ = fitted.get("pixel_threshold")
        model.calibration_scores_ = list(fitted.get("calibration_scores", []))
        model.grid_ = tuple(fitted["grid"])
        model.input_size_ = tuple(fitted["input_size"])
        model.n_train_images_ = int(fitted["n_train_images"])
        model.n_train_patches_ = int(fitted["n_train_patches"])
        return model


def nominal_threshold(nominal_scores: list[float]) -> float:
    """Decision threshold from held-out nominal scores: mean + 3 std (about 0.1% false alarms if
    nominal scores are roughly normal), and never below the largest held-out score. The max alone
    is too tight when only a few images are held out."""
    values = torch.tensor(nominal_scores, dtype=torch.float64)
    spread = float(values.std()) if values.numel() > 1 else 0.0
    return float(max(float(values.max()), float(values.mean()) + 3.0 * spread))


def _calibration_split(images: list, ratio: float, seed: int) -> tuple[list, list]:
    """Hold out round(ratio * n) images (seeded) to calibrate thresholds, at least min(5, n // 4) since
    a threshold from two or three scores is mostly noise; none if fewer than 10 images."""
    count = max(int(round(ratio * len(images))), min(5, len(images) // 4))
    if ratio <= 0 or len(images) < 10:
        return images, []
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    held_out = set(order[:count])
    return ([im for i, im in enumerate(images) if i not in held_out],
            [im for i, im in enumerate(images) if i in held_out])


def _batches(images: list[ImageInput], batch_size: int) -> Iterator[LoadedBatch]:
    """Paths are decoded in background threads; in-memory images are converted in place."""
    if all(isinstance(im, (str, Path)) for im in images):
        yield from iter_image_batches(images, batch_size)
        return
    for start in range(0, len(images), batch_size):
        batch = LoadedBatch([], [], [])
        for image in images[start:start + batch_size]:
            if isinstance(image, (str, Path)):
                from .images import read_image
                try:
                    batch.images.append(as_uint8_tensor(read_image(image)))
                    batch.paths.append(Path(image))
                except ImageReadError as err:
                    batch.failures.append(err)
            else:
                batch.images.append(as_uint8_tensor(image))
        yield batch


def _same_size_stacks(images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Consecutive runs of equally sized images, stacked (order kept)."""
    run: list[torch.Tensor] = []
    for image in images:
        if run and image.shape != run[0].shape:
            yield torch.stack(run)
            run = []
        run.append(image)
    if run:
        yield torch.stack(run)


def _concat_results(parts: list[PatchCoreResult]) -> PatchCoreResult:
    if not parts:
        raise ValueError("no images to score")
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat([v.cpu() for v in values])
    maps = [p.maps.cpu() for p in parts]
    if len({m.shape[1:] for m in maps}) > 1:
        raise ValueError("images gave maps of different sizes; use a fixed --resize H,W or a --crop")
    return PatchCoreResult(cat("scores"), torch.cat(maps), cat("labels"), cat("masks"))
