"""The PatchCore estimator: fit on nominal images, score new ones (sklearn-style: learned state ends in `_`).

It composes the pure functions of `core` as the config says; it holds no algorithm of its own.
fit: extract patch features -> JL projection -> greedy k-center coreset -> memory bank (section 2),
then score held-out training images to set the decision thresholds.
predict: patch features -> exact 1-NN in the bank -> eq. 6/7 image score and the blurred map (section 3).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._version import __version__
from ..config import PatchCoreConfig
from ..core.bank_index import BankIndex
from ..core.coreset import coreset_count, greedy_coreset, random_projection
from ..core.coreset_update import UpdateReport, extend_coreset
from ..core.knn import squared_norms
from ..core.scoring import anomaly_maps, region_patches, reweighted_image_scores, typical_nn_distance
from ..core.thresholds import (
    ROBUST_UPPER_QUANTILE,
    calibration_split,
    expected_false_alarms,
    fold_of_images,
    percent,
    quantile_threshold,
)
from ..errors import DeviceError, InputError, ModelFileError, NotFittedError
from ..io.feature_store import FeatureStore
from ..io.images import ImageReadError, as_uint8_tensor, read_image
from ..io.model_file import read_model_file, write_model_file
from ..io.preprocess import Preprocess
from ..io.sizing import feature_grid
from .extractor import Embedding, FeatureExtractor, Piece
from .geometry import aspect_mismatch, image_sizes, resolve_geometry
from .inputs import ImageInput, as_image_list, iter_batches
from .state import FittedState, config_from_file

log = logging.getLogger("patchcore")

DEFAULT_MAX_FEATURE_MEMORY = 1 << 30  # bytes of full-dimensional training features kept in RAM
MIN_CALIBRATION_IMAGES = 10  # fewer training images: no thresholds (a quantile from a handful is noise)
# Folds of whole training images for the out-of-sample nominal scores: each image is scored against a coreset
# bank of the other folds (80% of the images). More folds: banks closer to the model's, more second-stage runs.
CALIBRATION_FOLDS = 5
# The fold banks are made in two stages (see _out_of_fold_banks): each fold first reduced to a coreset this many
# times finer than the model's. 2: fold-bank scores within ~3% (median) of a greedy over all the other folds' rows
# at 0.3x its cost; 1 (the union of the folds' own coresets) is cheaper but scores 3-4% high (bottle, hazelnut).
FOLD_FINER = 2


class PatchCoreResult(NamedTuple):
    """What `predict` returns, always the same fields.

    scores: (N,) image anomaly scores (paper eq. 7). maps: pixel scores at the model's input geometry
    (after resize and crop): an (N, H, W) tensor when every image has the same model input size, else a
    list of N (H_i, W_i) tensors (images of different sizes or shapes; `maps[i]` works either way).
    labels: True = defect, by the image threshold (None without one); masks: True = defect pixel, by the
    pixel threshold (None without one), shaped like maps. Both thresholds are calibrated on held-out
    training images; they are on different scales (image score vs pixel score).
    """

    scores: torch.Tensor
    maps: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | None
    masks: torch.Tensor | list[torch.Tensor] | None


@dataclass
class PredictedBatch:
    """One batch from `iter_predict`: the scored files, their result, the files that failed to read,
    and the decoded images (uint8 (3, H, W), for drawing overlays without decoding twice)."""

    paths: list[Path]
    result: PatchCoreResult | None
    failures: list[ImageReadError]
    images: list[torch.Tensor]


@dataclass(frozen=True)
class _Group:
    """Images of one batch that share a model input size, for one backbone pass: their positions in the
    batch and their uint8 stack, as decoded when they also share their own size (the resize then runs
    batched), else each already resized and cropped to the model input (`at_input`)."""

    positions: list[int]
    stack: torch.Tensor
    at_input: bool


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
    geometry: str = ""  # the working geometry fit used, and why (estimator/geometry.py)
    thresholds: str = ""  # how the thresholds were set and what the image threshold means
    # Training images that score like defects against banks without their own rows: (name, score), highest
    # first. A line wants to look at them: a "good" set often holds a few parts that are not.
    suspects: list[tuple[str, float]] = field(default_factory=list)
    excluded_patches: int = 0  # exclude_outliers: training patches kept out of the bank as defect-like
    excluded_images: int = 0  # exclude_outliers: training images that held them, left out of the threshold evidence


@dataclass(frozen=True)
class _TrainingImage:
    """Where one training image's patch features sit in the feature store: its name, grid and input size,
    and per piece (row_start, rows, top, left, height, width) of its rows (with a region: only the inside ones)."""

    name: str
    grid: tuple[int, int]
    input_size: tuple[int, int]
    pieces: tuple[tuple[int, int, int, int, int], ...]


class TrainingFeatures(NamedTuple):
    """What fit's feature extraction gives: the store of every training patch feature, their d*-dimensional
    projection, the largest grid and input size, and where each image's rows are."""

    store: object  # a FeatureStore (or another store with gather / rows / spilled / close)
    projected: torch.Tensor
    grid: tuple[int, int]
    input_size: tuple[int, int]
    images: list[_TrainingImage]


@dataclass(frozen=True)
class _Fitted:
    """The learned state and what is derived from it, swapped together so a concurrent predict never
    sees a bank with another bank's index."""

    state: FittedState
    index: BankIndex  # exact 1-NN search structure over the bank (derived, never saved)
    bank_sq_norms: torch.Tensor  # (M,) for the eq. 7 neighbourhood search


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but torch sees no CUDA device")
    return device


class PatchCore:
    """PatchCore (Roth et al., CVPR 2022). Safe to share between threads for concurrent predict calls.

    >>> model = PatchCore(PatchCoreConfig(backbone="efficientnet_lite0")).fit(train_paths)
    >>> result = model.predict(test_paths)   # PatchCoreResult(scores, maps, labels, masks)
    """

    def __init__(self, config: PatchCoreConfig | None = None, *, device: str | torch.device = "auto"):
        self.config = config or PatchCoreConfig()
        self.device = resolve_device(device)
        self.extractor = FeatureExtractor(self.config, self.device)
        self._fitted: _Fitted | None = None

    # ------------------------------------------------------------------ features
    @property
    def backbone(self):
        return self.extractor.backbone

    @property
    def preprocess(self) -> Preprocess:
        return self.extractor.preprocess

    @property
    def embedding_dim(self) -> int:
        return self.extractor.embedding_dim

    def embed(self, images: torch.Tensor) -> Embedding:
        """uint8 (B, 3, H, W) -> Embedding(features (B, h*w, D), grid (h, w), input size (H', W'))."""
        return self.extractor(images)

    def _iter_groups(self, images: list, region_size: tuple[int, int] | None = None
                     ) -> Iterator[tuple[object, list[_Group]]]:
        """(batch, its images grouped by model input size): the one walk every entry point uses. Images of
        any size and shape go together; each group is one backbone pass (split past MAX_FORWARD_PIXELS).
        Images the model cannot take (too large once resized, smaller than the crop, of another aspect ratio
        than an exact resize was fitted for, of another size than the inspection region) are per-file
        failures of their batch, not errors of the run."""
        def check(height: int, width: int) -> None:
            self._check_input(height, width, region_size)

        # On the CPU each file is also resized and cropped to its model input in its decoding thread: Pillow
        # releases the GIL there, so the resize overlaps the backbone instead of following it (the same kernel,
        # io/resize.py, so the same pixels). On a GPU the batch is resized there instead.
        prepare = self._model_input if self.device.type == "cpu" else None
        for batch in iter_batches(images, self.config.batch_size, check=check, prepare=prepare):
            yield batch, self._groups(batch.images, batch.prepared)

    def _model_input(self, pixels: np.ndarray) -> torch.Tensor:
        """A decoded (H, W, 3) uint8 file -> its uint8 (3, H', W') model input (resize and centre crop)."""
        return self.preprocess.geometry(as_uint8_tensor(pixels))

    def _groups(self, images: list[torch.Tensor], prepared: list[torch.Tensor] | None = None) -> list[_Group]:
        """`prepared`: the images already at their model input (iter_batches' prepare), one per image."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(self.preprocess.output_size(*image.shape[-2:]), []).append(i)
        groups = []
        for positions in by_size.values():
            members = [images[i] for i in positions]
            at_input = bool(prepared) or len({m.shape for m in members}) > 1
            stack = torch.stack([prepared[i] for i in positions] if prepared else
                                [self.preprocess.geometry(m) for m in members] if at_input else members)
            start = 0
            for part in _forward_sized(stack):
                groups.append(_Group(positions[start:start + part.shape[0]], part, at_input))
                start += part.shape[0]
        return groups

    def _check_input(self, height: int, width: int, region_size: tuple[int, int] | None = None) -> None:
        self.preprocess.check_size(height, width)
        problem = aspect_mismatch(self.config, height, width)
        if problem is not None:
            raise InputError(f"a {height} x {width} image: {problem}")
        if region_size is not None and self.preprocess.output_size(height, width) != tuple(region_size):
            size = self.preprocess.output_size(height, width)
            raise InputError(f"a {height} x {width} image becomes {size[0]} x {size[1]} at the model input, the "
                             f"inspection region is {region_size[0]} x {region_size[1]}: a region model takes "
                             "images of its training size")

    # ------------------------------------------------------------------ fitted state
    def _checked_fitted(self) -> _Fitted:
        fitted = self._fitted
        if fitted is None:
            raise NotFittedError("this PatchCore model is not fitted yet: call fit() or PatchCore.load()")
        return fitted

    @property
    def state_(self) -> FittedState:
        return self._checked_fitted().state

    def set_state(self, state: FittedState) -> PatchCore:
        """Install a learned state (from fit, load, an update, or a benchmark's own bank) and build what
        derives from it, once, here: never on first use. A concurrent predict sees the old state or the
        new one, never a mix."""
        bank = state.memory_bank.to(self.device)
        state = state.replace(memory_bank=bank)
        self._fitted = _Fitted(state, BankIndex(bank), squared_norms(bank))
        return self

    def with_thresholds(self, *, image: float | None = None, pixel: float | None = None) -> PatchCore:
        """Override the decision thresholds (each on its own scale); None keeps the current one. NaN or
        infinite is an InputError: NaN labels every image good, and save() would write a file load() refuses."""
        state = self.state_
        for name, value in (("image", image), ("pixel", pixel)):
            if value is not None and not math.isfinite(float(value)):
                raise InputError(f"the {name} threshold must be a finite number, got {value}")
        changes = {}
        if image is not None:
            changes["image_threshold"] = float(image)
        if pixel is not None:
            changes["pixel_threshold"] = float(pixel)
        fitted = self._fitted
        self._fitted = _Fitted(state.replace(**changes), fitted.index, fitted.bank_sq_norms)
        return self

    # Read-only views of the learned state, sklearn-style.
    memory_bank_ = property(lambda self: self.state_.memory_bank)
    distance_scale_ = property(lambda self: self.state_.distance_scale)
    image_threshold_ = property(lambda self: self.state_.image_threshold)
    pixel_threshold_ = property(lambda self: self.state_.pixel_threshold)
    calibration_scores_ = property(lambda self: list(self.state_.calibration_scores))
    grid_ = property(lambda self: self.state_.grid)
    input_size_ = property(lambda self: self.state_.input_size)
    n_train_images_ = property(lambda self: self.state_.n_train_images)
    n_train_patches_ = property(lambda self: self.state_.n_train_patches)
    weights_sha256_ = property(lambda self: self.state_.backbone_weights_sha256)

    @property
    def bank_index(self) -> BankIndex:
        return self._checked_fitted().index

    # ------------------------------------------------------------------ fit
    def fit(self, images: Sequence[ImageInput], *, progress: Callable[[int], None] | None = None,
            max_feature_memory: int = DEFAULT_MAX_FEATURE_MEMORY, spill_dir: str | Path | None = None) -> PatchCore:
        """Build the coreset memory bank from nominal images (paths, arrays, PIL images or tensors).

        Every image enters the bank; the decision thresholds are the (1 - config.false_alarm_rate) quantile of
        out-of-sample nominal scores: each training image scored against the bank without the rows of its
        fold (with calibration_ratio > 0, a held-out share instead). Training images that score above the
        threshold are listed in `fit_report_.suspects`. Unreadable files are skipped with a warning naming each
        (`fit_report_.skipped`); no readable image at all is an error.
        """
        images = as_image_list(images)
        if not images:
            raise InputError("fit needs at least one image")
        chosen, geometry = resolve_geometry(self.config, images)
        if chosen != self.config:  # the whole part instead of the MVTec crop: features at the chosen size
            self.config, self.extractor = chosen, FeatureExtractor(chosen, self.device)
        cfg = self.config
        fit_images, calibration_images = calibration_split(images, cfg.calibration_ratio, cfg.seed)
        report = FitReport(n_calibration_images=len(calibration_images), geometry=geometry)
        generator = torch.Generator().manual_seed(cfg.seed)
        started = time.perf_counter()
        store = None
        try:
            region = self._read_region()
            self._check_region(region, fit_images)
            training = self._extract_training_features(
                fit_images, region, report, generator, progress, max_feature_memory, spill_dir)
            store, projected = training.store, training.projected
            report.embed_seconds = time.perf_counter() - started

            started = time.perf_counter()
            projected -= projected.mean(0)  # k-center is translation invariant; see greedy_coreset
            report.n_patches = projected.shape[0]
            clean = cfg.exclude_outliers and not calibration_images and len(training.images) >= MIN_CALIBRATION_IMAGES
            self._build_bank(training, projected, None, generator, region, report)
            report.features_spilled_to_disk = store.spilled
            report.coreset_seconds = time.perf_counter() - started

            started = time.perf_counter()
            if calibration_images:
                self._calibrate(calibration_images, report)
            elif len(training.images) >= MIN_CALIBRATION_IMAGES:
                outlying = self._calibrate_out_of_fold(training, projected, None, report, row_distances=clean)
                if clean and outlying is not None and bool(outlying.any()):
                    # SoftPatch's idea (PATCHCORE.md section 5): training patches that score like defects against
                    # the other folds never enter the bank, and the images that held them are no nominal evidence
                    # for the thresholds; the coreset and the thresholds are made again without them.
                    report.excluded_patches = int(outlying.sum())
                    kept = (~outlying).nonzero()[:, 0]
                    evidence = np.array([not any(bool(outlying[start:start + count].any())
                                                 for start, count, *_ in image.pieces) for image in training.images])
                    report.excluded_images = int((~evidence).sum())
                    self._build_bank(training, projected, kept, generator, region, report)
                    self._calibrate_out_of_fold(training, projected, kept, report, evidence=evidence)
            report.calibration_seconds = time.perf_counter() - started
        finally:
            if store is not None:
                store.close()
        self.fit_report_ = report
        return self

    def _build_bank(self, training: TrainingFeatures, projected: torch.Tensor, candidates: torch.Tensor | None,
                    generator: torch.Generator, region: torch.Tensor | None, report: FitReport) -> None:
        """Greedy k-center coreset over the projected rows (or the `candidates` among them) -> the memory bank,
        installed as the state (thresholds not yet set)."""
        cfg = self.config
        pool = projected if candidates is None else projected[candidates]
        n = coreset_count(pool.shape[0], cfg.coreset_ratio, cfg.coreset_size)
        selected = greedy_coreset(pool.to(self.device), n, generator=generator).cpu()
        # Sorted: bank order follows the training data, so the file is independent of selection order.
        bank_rows = (selected if candidates is None else candidates[selected]).sort().values
        bank = training.store.gather(bank_rows).to(self.device)
        report.coreset_size = n
        self.set_state(FittedState(
            memory_bank=bank,
            distance_scale=typical_nn_distance(bank, squared_norms(bank), generator=generator),  # T of eq. 7
            image_threshold=None, pixel_threshold=None, calibration_scores=(),
            grid=training.grid, input_size=training.input_size, n_train_images=report.n_images,
            n_train_patches=report.n_patches, backbone_weights_sha256=self.extractor.weights_sha256, region=region))

    def _extract_training_features(self, images: list, region: torch.Tensor | None, report: FitReport,
                                   generator: torch.Generator, progress, max_feature_memory: int,
                                   spill_dir) -> TrainingFeatures:
        """Every training patch feature into a FeatureStore (spilled to disk past the budget), and its
        d*-dimensional JL projection (psi, section 2) into one preallocated (N, d*) tensor.

        Images of different sizes each bring their own grid: the bank is a set of patch features, and every
        test patch is scored against all of it (section 3), so nothing here needs one grid. The state's
        grid and input size are the largest over the training images (one image's, for one size). Where
        each image's rows went is kept (TrainingFeatures.images) for the out-of-fold thresholds."""
        cfg = self.config
        store = projection = projected = None
        grid = input_size = (0, 0)
        rows_done = offset = 0
        region_size = None if region is None else tuple(region.shape)
        placed: list[_TrainingImage] = []
        try:
            for batch, groups in self._iter_groups(images, region_size):
                report.skipped += [str(err) for err in batch.failures]
                for err in batch.failures:
                    log.warning("skipped training image %s", err)
                if progress is not None:
                    progress(len(batch.images) + len(batch.failures))
                for group in groups:
                    stack_grid, stack_input, pieces = self.extractor.pieces(group.stack, at_input=group.at_input)
                    grid = (max(grid[0], stack_grid[0]), max(grid[1], stack_grid[1]))
                    input_size = (max(input_size[0], stack_input[0]), max(input_size[1], stack_input[1]))
                    inside = self._region_patches(region, stack_grid)
                    where: list[list] = [[] for _ in group.positions]
                    for piece in pieces:
                        rows = piece.features
                        if inside is not None:  # patches outside the inspection region never enter the bank
                            kept = inside[piece.top:piece.top + piece.height, piece.left:piece.left + piece.width]
                            rows = rows[:, kept.flatten().to(rows.device)]
                        per_image = rows.shape[1]
                        for b, rows_of_image in enumerate(where):
                            rows_of_image.append((rows_done + b * per_image, per_image, piece.top, piece.left,
                                                  piece.height, piece.width))
                        rows = rows.flatten(0, 1)
                        if store is None:
                            store = FeatureStore(rows.shape[1], max_memory_bytes=max_feature_memory,
                                                 spill_dir=spill_dir)
                            projection = random_projection(rows.shape[1], cfg.projection_dim, generator).to(self.device)
                            # Allocated once from the images' header sizes: no list + cat doubling for large sets.
                            projected = torch.empty(self._patch_count_bound(images), cfg.projection_dim)
                        if rows_done + rows.shape[0] > projected.shape[0]:  # a size the headers did not tell
                            grown = torch.empty(max(2 * projected.shape[0], rows_done + rows.shape[0]),
                                                cfg.projection_dim)
                            grown[:rows_done] = projected[:rows_done]
                            projected = grown
                        projected[rows_done:rows_done + rows.shape[0]] = (rows @ projection).cpu()
                        rows_done += rows.shape[0]
                        store.append(rows)
                    for position, rows_of_image in zip(group.positions, where):
                        name = str(batch.paths[position]) if batch.paths else f"#{offset + position}"
                        placed.append(_TrainingImage(name, stack_grid, stack_input, tuple(rows_of_image)))
                    report.n_images += group.stack.shape[0]
                offset += len(batch.images)
        except BaseException:
            if store is not None:
                store.close()
            raise
        if store is None:
            raise InputError("no readable training image: " + "; ".join(report.skipped[:5]))
        if rows_done == 0:
            raise InputError(f"{cfg.region}: the inspection region covers no patch of the training images")
        # projected[:rows_done]: a view; skipped files leave the tail unused
        return TrainingFeatures(store, projected[:rows_done], grid, input_size, placed)

    def _patch_count_bound(self, images: list) -> int:
        """Patches the images will give at most, from their sizes (file headers; no decoding)."""
        stride = self.config.feature_strides[0]
        total = 0
        for height, width in image_sizes(images):
            try:
                self.preprocess.check_size(height, width)
            except InputError:  # refused when decoded
                continue
            grid = feature_grid(self.preprocess.output_size(height, width), stride)
            total += grid[0] * grid[1]
        return max(total, 1)

    def _check_region(self, region: torch.Tensor | None, images: list) -> None:
        """A region mask the size of the training images (checked on the first; each image is checked again
        when decoded, and one of another size is skipped, named)."""
        sizes = image_sizes(images[:1]) if region is not None else []
        if sizes and self.preprocess.output_size(*sizes[0]) != tuple(region.shape):
            raise InputError(f"{self.config.region}: the inspection region becomes {tuple(region.shape)} at the "
                             f"model input, the training images {self.preprocess.output_size(*sizes[0])}: give "
                             "a mask the size of the training images")

    def _read_region(self) -> torch.Tensor | None:
        """The inspection region file -> bool (H', W') at the model input: the images' resize and crop."""
        if self.config.region is None:
            return None
        picture = read_image(self.config.region)  # ImageReadError names the file
        return torch.from_numpy(self.preprocess.mask_geometry(picture.max(axis=2) > 0))

    def _calibrate(self, images: list, report: FitReport) -> None:
        """Thresholds from held-out nominal images (calibration_ratio > 0): image scores for the image
        threshold, each image's largest pixel score for the pixel threshold (never from test images)."""
        scores, pixel_max, names = [], [], []
        fitted = self._checked_fitted()
        for batch, groups in self._iter_groups(images, _region_size(fitted.state)):
            report.skipped += [str(err) for err in batch.failures]
            for err in batch.failures:
                log.warning("skipped held-out calibration image %s", err)
            for group in groups:
                result = self._score_stack(group.stack, fitted, at_input=group.at_input)
                scores += result.scores.tolist()
                pixel_max += result.maps.flatten(1).amax(1).tolist()
                names += [str(batch.paths[p]) for p in group.positions] if batch.paths else \
                    [f"held-out #{len(names) + k}" for k in range(len(group.positions))]
        report.n_calibration_images = len(scores)  # the readable ones
        if len(scores) >= 2:
            self._set_thresholds(scores, pixel_max, names, report, f"{len(scores)} held-out training images")

    @torch.inference_mode()
    def _calibrate_out_of_fold(self, training: TrainingFeatures, projected: torch.Tensor,
                               candidates: torch.Tensor | None, report: FitReport, *, row_distances: bool = False,
                               evidence: np.ndarray | None = None) -> torch.Tensor | None:
        """Thresholds from every training image, each scored like a new part: against a coreset bank made from
        the other folds' images only (CALIBRATION_FOLDS folds of whole images, seeded; _out_of_fold_banks).
        Out-of-sample nominal scores, as a hold-out gives, while the model's bank keeps every image.

        Why a coreset per fold and not the model's bank without the fold's rows: the coreset keeps one row
        per neighbourhood, so rows from other images near this image's patches were left out as redundant;
        without this image's rows its patches look far from everything (bottle, 1% bank: 22 of 209 good
        images above a 1% threshold, measured). `candidates`: the rows the coreset may pick (exclude_outliers).
        row_distances: also return, per training patch (store row), whether its own out-of-fold nearest distance
        is above a cut that a quarter of bad images cannot move (the image scores' log-normal through their
        median and 75th percentile, at 1/100 of the target rate): a patch that scores like a defect among the
        other images' patches. evidence: (n,) bool, the images whose scores set the thresholds (default all)."""
        cfg, state = self.config, self.state_
        images = training.images
        folds = min(CALIBRATION_FOLDS, len(images))
        fold = fold_of_images(len(images), folds, cfg.seed)
        pieces = sorted((piece[0], piece[1], i) for i, image in enumerate(images) for piece in image.pieces)
        row_fold = torch.from_numpy(np.repeat(fold[[i for *_, i in pieces]], [count for _, count, _ in pieces]))
        allowed = torch.ones(len(row_fold), dtype=torch.bool)
        if candidates is not None:
            allowed = torch.zeros_like(allowed).index_fill_(0, candidates, True)
        scores, pixel_max = np.zeros(len(images)), np.zeros(len(images))
        patch_dist = torch.zeros(len(row_fold)) if row_distances else None
        for f, bank_rows in enumerate(self._out_of_fold_banks(projected, row_fold, allowed, folds)):
            if bank_rows is None:  # every usable row is in this fold (a tiny set): nothing to score against
                return None
            bank = training.store.gather(bank_rows).to(self.device)
            fitted = _Fitted(state.replace(memory_bank=bank), BankIndex(bank), squared_norms(bank))
            for i in np.nonzero(fold == f)[0]:
                image = images[i]
                parts = [self._stored_piece(training.store, image, piece, state.region) for piece in image.pieces]
                result = self._score_pieces(parts, image.grid, image.input_size, 1, fitted)
                scores[i], pixel_max[i] = float(result.scores[0]), float(result.maps[0].max())
                if patch_dist is not None:
                    for start, count, *_ in image.pieces:
                        rows = training.store.gather(torch.arange(start, start + count)).to(self.device)
                        patch_dist[start:start + count] = fitted.index.search(rows)[0].cpu()
        used = np.ones(len(images), dtype=bool) if evidence is None else evidence
        self._set_thresholds(scores.tolist(), pixel_max.tolist(), [image.name for image in images], report,
                             f"{int(used.sum())} training images, each scored against a coreset bank of the other "
                             f"{folds - 1} of {folds} folds", used=used)
        if patch_dist is None:
            return None
        # The cut: a score a nominal image reaches with probability rate / 100 under the log-normal through the
        # median and the 75th percentile (thinner-tailed than the nominal scores, so the factor 100 keeps
        # nominal images below it: 3 of 209 on bottle, 0 of 50 on hazelnut; their defects: 100% and 88% above).
        cut = quantile_threshold(scores, cfg.false_alarm_rate / 100, upper_quantile=ROBUST_UPPER_QUANTILE)
        return patch_dist > cut

    def _out_of_fold_banks(self, projected: torch.Tensor, row_fold: torch.Tensor, allowed: torch.Tensor,
                           folds: int) -> Iterator[torch.Tensor | None]:
        """For each fold f: the store rows (ascending) of a coreset bank of the other folds' allowed rows, as many
        rows as fit's own rule gives for them (None where no row is left).

        Two stages, as composable coresets are made: each fold's rows are reduced once to a greedy coreset
        FOLD_FINER times finer than the model's, and fold f's bank is the greedy coreset of the union of the
        other folds' finer coresets. Every row of the other folds lies within the finer coresets' radius of that
        union, so the bank covers them nearly as a greedy over all their rows would, for one pass over every row
        at the finer ratio instead of one full greedy per fold (bottle, 1%: 3.3 s of CPU instead of 11)."""
        cfg = self.config
        ratio = cfg.coreset_ratio if cfg.coreset_size is None else cfg.coreset_size / max(1, int(allowed.sum()))
        finer: list[torch.Tensor] = []
        for g in range(folds):
            rows = ((row_fold == g) & allowed).nonzero()[:, 0]
            if FOLD_FINER * ratio < 0.5 and rows.numel():  # else the first stage would keep most rows: skipped
                count = coreset_count(rows.numel(), FOLD_FINER * ratio)
                generator = torch.Generator().manual_seed(cfg.seed + 1 + folds + g)
                rows = rows[greedy_coreset(projected[rows].to(self.device), count, generator=generator).cpu()]
            finer.append(rows)
        for f in range(folds):
            pool = torch.cat([finer[g] for g in range(folds) if g != f]).sort().values
            n = coreset_count(int(((row_fold != f) & allowed).sum()), cfg.coreset_ratio, cfg.coreset_size)
            if pool.numel() == 0 or n >= pool.numel():
                yield pool if pool.numel() else None
                continue
            generator = torch.Generator().manual_seed(cfg.seed + 1 + f)
            yield pool[greedy_coreset(projected[pool].to(self.device), n, generator=generator).cpu()].sort().values

    def _stored_piece(self, store, image: _TrainingImage, piece: tuple, region: torch.Tensor | None) -> Piece:
        """One piece of a training image's grid back from the feature store, as the extractor gave it (with a
        region, the outside patches as zeros: they score zero anyway)."""
        start, count, top, left, height, width = piece
        rows = store.gather(torch.arange(start, start + count)).to(self.device)
        inside = self._region_patches(region, image.grid)
        if inside is not None:
            full = rows.new_zeros(height * width, rows.shape[1])
            full[inside[top:top + height, left:left + width].flatten().to(rows.device)] = rows
            rows = full
        return Piece(rows[None], top, left, height, width)

    def _set_thresholds(self, scores: list[float], pixel_max: list[float], names: list[str], report: FitReport,
                        source: str, used: np.ndarray | None = None) -> None:
        """Image and pixel thresholds at the (1 - false_alarm_rate) quantile of the nominal scores (each on its
        own scale: image scores, and each image's largest pixel score) of the `used` images (default all); the
        suspects among all; what it means."""
        rate = self.config.false_alarm_rate
        if used is None or int(used.sum()) < MIN_CALIBRATION_IMAGES:  # too few left: all of them, as without
            used = np.ones(len(scores), dtype=bool)
        nominal, nominal_pixels = np.asarray(scores)[used], np.asarray(pixel_max)[used]
        image_threshold = quantile_threshold(nominal, rate)
        state = self.state_.replace(calibration_scores=tuple(float(s) for s in nominal),
                                    image_threshold=image_threshold,
                                    pixel_threshold=quantile_threshold(nominal_pixels, rate))
        fitted = self._fitted
        self._fitted = _Fitted(state, fitted.index, fitted.bank_sq_norms)
        report.n_calibration_images = len(nominal)
        estimate = expected_false_alarms(nominal, image_threshold, seed=self.config.seed)
        report.thresholds = (f"set for {percent(rate)} false alarms from the out-of-sample scores of {source}: "
                             f"{estimate.text()}")
        report.suspects = sorted(((name, float(s)) for name, s in zip(names, scores) if s > image_threshold),
                                 key=lambda item: -item[1])

    # ------------------------------------------------------------------ predict
    @torch.inference_mode()
    def _score_stack(self, images: torch.Tensor, fitted: _Fitted, *, at_input: bool = False) -> PatchCoreResult:
        """The one scoring core. uint8 (B, 3, H, W), all the same size -> PatchCoreResult.

        Piece by piece (one piece without tiling): exact 1-NN of every patch, kept as a (B, h, w) grid of
        distances; of the features only each image's farthest patch (m_test,*) is kept, for eq. 7.
        `fitted` is read once per call by the entry points, so a concurrent `set_state` cannot mix two
        states in one result."""
        grid, input_size, pieces = self.extractor.pieces(images, at_input=at_input)
        return self._score_pieces(pieces, grid, input_size, images.shape[0], fitted)

    def _score_pieces(self, pieces, grid: tuple[int, int], input_size: tuple[int, int], batch: int,
                      fitted: _Fitted) -> PatchCoreResult:
        """Patch features of `batch` images, piece by piece, -> PatchCoreResult (the scoring core's second half;
        fit's out-of-fold scoring enters here with features it already has)."""
        state = fitted.state
        h, w = grid
        inside = self._region_patches(state.region, grid)
        dim = state.memory_bank.shape[1]
        patch_dist = torch.zeros(batch, h, w, device=self.device)
        # m_test,* of eq. 7 so far: each image's farthest patch, its distance (s*) and its nearest bank row m*
        farthest = torch.full((batch,), -1.0, device=self.device)
        farthest_feature = torch.zeros(batch, dim, device=self.device)
        farthest_idx = torch.zeros(batch, dtype=torch.long, device=self.device)
        images_ = torch.arange(batch, device=self.device)
        for piece in pieces:
            features = piece.features
            if features.shape[-1] != dim:
                raise RuntimeError(f"feature size {features.shape[-1]} does not match the memory bank's {dim}")
            dist, idx = fitted.index.search(features.reshape(-1, dim))  # exact 1-NN of every patch
            dist, idx = dist.view(batch, -1), idx.view(batch, -1)
            rows, cols = slice(piece.top, piece.top + piece.height), slice(piece.left, piece.left + piece.width)
            if inside is not None:  # outside the inspection region every patch scores zero
                dist = dist * inside[rows, cols].flatten().to(dist)
            patch_dist[:, rows, cols] = dist.view(batch, piece.height, piece.width)
            piece_max, piece_arg = dist.max(1)  # s* candidates (eq. 6)
            better = piece_max > farthest
            farthest = torch.where(better, piece_max, farthest)
            farthest_feature[better] = features[images_, piece_arg][better]
            farthest_idx[better] = idx[images_, piece_arg][better]
        # eq. 7 needs only m_test,* and its distance: the same numbers as over all patches.
        scores = reweighted_image_scores(farthest_feature[:, None], farthest[:, None], farthest_idx[:, None],
                                         state.memory_bank, fitted.bank_sq_norms,
                                         self.config.reweight_neighbours, state.distance_scale)
        maps = anomaly_maps(patch_dist.flatten(1), grid, input_size, self.config.blur_sigma)
        if state.region is not None:
            maps = maps * state.region.to(maps)
        labels = None if state.image_threshold is None else scores > state.image_threshold
        masks = None if state.pixel_threshold is None else maps > state.pixel_threshold
        return PatchCoreResult(scores, maps, labels, masks)

    @staticmethod
    def _region_patches(region: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
        """(H', W') inspection region at the model input -> (h, w) bool: the patches whose centre it covers."""
        return None if region is None else region_patches(region.cpu(), grid)  # core: shared with the runtime

    def maps_at_original_size(self, maps: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(B, H', W') maps at the model input -> (B, H, W) at the input images' own size: the resize undone
        (bilinear, as the maps are drawn) and the crop undone. Pixels the model never saw (outside the
        centre crop) are NaN: unknown, not good."""
        height, width = original_size
        resized = self.preprocess.resized_size(height, width)
        top, left, crop_h, crop_w = self.preprocess.crop_box(height, width)
        scale_y, scale_x = height / resized[0], width / resized[1]
        y0, y1 = round(top * scale_y), round((top + crop_h) * scale_y)
        x0, x1 = round(left * scale_x), round((left + crop_w) * scale_x)
        out = torch.full((maps.shape[0], height, width), float("nan"), dtype=maps.dtype, device=maps.device)
        seen = maps if (y1 - y0, x1 - x0) == tuple(maps.shape[-2:]) else torch.nn.functional.interpolate(
            maps[:, None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[:, 0]
        out[:, y0:y1, x0:x1] = seen
        return out

    def predict_batch(self, images: torch.Tensor) -> PatchCoreResult:
        """Score one uint8 (B, 3, H, W) batch in a single pass (the serving path; tensors may be on the GPU).
        The checks of every other entry point apply (an InputError for a size the model cannot take)."""
        fitted = self._checked_fitted()
        self._check_input(*images.shape[-2:], _region_size(fitted.state))
        return self._score_stack(images, fitted)

    def predict(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> PatchCoreResult:
        """Score one image or a sequence of images (paths, arrays, PIL images, (3, H, W) tensors) of any sizes,
        or a uint8 (B, 3, H, W) batch, which may already be on the model's device. Results are in input order;
        maps come as a list when the images have different model input sizes. An unreadable file raises
        ImageReadError naming it; `iter_predict` instead reports such files and goes on."""
        fitted = self._checked_fitted()
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            self._check_input(*images.shape[-2:], _region_size(fitted.state))
            step = self.config.batch_size
            return _concat_results([self._score_stack(images[i:i + step], fitted)
                                    for i in range(0, images.shape[0], step)])
        per_image: list[tuple] = []  # (score, map, label, mask) in input order
        for batch, groups in self._iter_groups(as_image_list(images), _region_size(fitted.state)):
            if batch.failures:
                raise batch.failures[0]
            per_image += self._score_groups(groups, fitted)
        return _stack_results(per_image)

    def iter_predict(self, paths: Sequence[str | Path]) -> Iterator[PredictedBatch]:
        """Stream batches in input order: unreadable files are reported in `failures`, the rest scored (maps
        as a list where the batch's images have different model input sizes, as `predict`)."""
        fitted = self._checked_fitted()  # one state for the whole stream
        for batch, groups in self._iter_groups(as_image_list(paths), _region_size(fitted.state)):
            result = _stack_results(self._score_groups(groups, fitted)) if groups else None
            yield PredictedBatch(batch.paths, result, batch.failures, batch.images)

    def _score_groups(self, groups: list[_Group], fitted: _Fitted) -> list[tuple]:
        """One batch's groups -> (score, map, label, mask) per image, in the batch's order."""
        per_image: list = [None] * sum(len(g.positions) for g in groups)
        for group in groups:
            result = self._score_stack(group.stack, fitted, at_input=group.at_input)
            for k, position in enumerate(group.positions):
                per_image[position] = _image_result(result, k)
        return per_image

    # ---- incremental update
    def update(self, images: Sequence[ImageInput], *, max_new: int | None = None,
               radius: float | None = None) -> PatchCore:
        """Add new nominal images to the fitted bank without refitting; returns self (as fit does).

        The greedy k-center selection continues from the bank (its rows count as selected) over the new
        images' patches, until every new patch is within `radius` of the bank or `max_new` rows were
        added. `radius` defaults to distance_scale, an estimate of the bank's coverage radius. The
        old bank stays, in order, as the first rows; new rows follow in selection order. Thresholds,
        calibration scores and distance_scale (T of eq. 7) are kept: they were set on held-out nominal
        images, and more nominal coverage only lowers nearest-neighbour distances. The new state is
        built aside and installed with set_state, so concurrent predicts see the old or the new bank.
        One update at a time per model. Report: `update_report_`.
        """
        started = time.perf_counter()
        state = self.state_
        images = as_image_list(images)
        if not images:
            raise InputError("update needs at least one image")
        report = UpdateReport(bank_before=state.memory_bank.shape[0])
        rows = []
        grid, input_size = state.grid, state.input_size  # the largest over all images, as fit keeps them
        for batch, groups in self._iter_groups(images, _region_size(state)):
            report.skipped += [str(err) for err in batch.failures]
            for err in batch.failures:
                log.warning("skipped update image %s", err)
            for group in groups:  # any size: each image brings its own grid, as in fit
                embedding = self.extractor(group.stack, at_input=group.at_input)
                features = embedding.features
                inside = self._region_patches(state.region, embedding.grid)
                if inside is not None:  # as in fit: outside the inspection region nothing enters the bank
                    features = features[:, inside.flatten().to(features.device)]
                rows.append(features.flatten(0, 1).to(state.memory_bank.device))
                report.n_images += group.stack.shape[0]
                if state.region is None:  # (with a region every image has the region's size)
                    grid = (max(grid[0], embedding.grid[0]), max(grid[1], embedding.grid[1]))
                    input_size = (max(input_size[0], embedding.input_size[0]),
                                  max(input_size[1], embedding.input_size[1]))
        if not rows:
            raise InputError("no readable update image: " + "; ".join(report.skipped[:5]))
        features = torch.cat(rows)
        report.n_patches = features.shape[0]
        bank, bank_sq_norms = state.memory_bank, self._fitted.bank_sq_norms
        if radius is None:
            # T (the bank's median nearest-other distance) came 0-13% below the D-space coverage
            # radius of the fit's own patches in our measurements (docs/SERVER.md): new patches end up
            # covered at least as tightly as the training patches were. Saved in every model file.
            radius = state.distance_scale
        extension = extend_coreset(bank, features, float(radius), max_new=max_new, bank_sq_norms=bank_sq_norms)
        new_bank = torch.cat([bank, features[extension.selected.to(features.device)]])
        # a larger image than any before raises grid and input size: n_train_patches stays within
        # n_train_images x grid, so the saved file loads (an update with one rotated image wrote one that did not)
        self.set_state(state.replace(memory_bank=new_bank, n_train_images=state.n_train_images + report.n_images,
                                     n_train_patches=state.n_train_patches + report.n_patches, grid=grid,
                                     input_size=input_size))
        report.bank_after = new_bank.shape[0]
        report.radius, report.stopped_by = float(radius), extension.stopped_by
        report.initial_radius, report.covering_radius = extension.initial_radius, extension.covering_radius
        report.seconds = time.perf_counter() - started
        self.update_report_ = report
        return self
    # ---- end incremental update

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the model atomically: bank as safetensors, everything else as JSON (no pickle)."""
        tensors, header = self.file_parts()
        write_model_file(path, tensors, header)

    def file_parts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The model file's tensors and JSON header, as save writes them (an ensemble file holds one set per
        member: estimator/ensemble.py)."""
        state = self.state_
        header = {
            "package_version": __version__,
            "config": self.config.to_dict(),
            "backbone": self.config.backbone,
            "backbone_weights_sha256": state.backbone_weights_sha256,
            "fitted": state.fitted_header(),
        }
        tensors = {"memory_bank": state.memory_bank.float()}
        if state.region is not None:
            tensors["region"] = state.region.to(torch.uint8)
        return tensors, header

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto", weights: str | None = None) -> PatchCore:
        """Rebuild a saved model. `weights` points at a local copy of the backbone weights when the
        path recorded at fit time does not exist here; they must hash to what the model was fitted with."""
        built = {}

        def check_header(shapes, header):  # before the bank is read: refuse what the header alone refutes
            built["model"] = cls.from_file_header(shapes, header, path, device=device, weights=weights)

        tensors, header = read_model_file(path, tensor_schema=FittedState.TENSORS,
                                          optional_tensors=FittedState.OPTIONAL_TENSORS, check_header=check_header)
        return built["model"].install_file_state(tensors, header, path)

    @classmethod
    def from_file_header(cls, shapes: dict, header: dict, path: str | Path, *, device: str | torch.device = "auto",
                         weights: str | None = None) -> PatchCore:
        """An unfitted model from a model file's header, checked before any tensor data is read (`shapes`:
        {tensor name: (dtype, shape)}); `install_file_state` then installs the tensors. Shared by `load` and
        the ensemble's loader (one header per member)."""
        FittedState.check_header(shapes, header, path)
        model = cls(config_from_file(header, path, weights=weights), device=device)
        if shapes["memory_bank"][1][1] != model.embedding_dim:
            raise ModelFileError(f"{path}: memory bank of shape {tuple(shapes['memory_bank'][1])} does not fit "
                                 f"backbone {model.config.backbone} with embedding size {model.embedding_dim}")
        return model

    def install_file_state(self, tensors: dict, header: dict, path: str | Path) -> PatchCore:
        """The learned state read from a model file, checked (schema, bounds, backbone weights) and installed."""
        model, config = self, self.config
        state = FittedState.from_file(tensors, header, path)
        if model.extractor.weights_sha256 != state.backbone_weights_sha256:
            raise ModelFileError(
                f"{path}: the backbone weights found here for {config.backbone} are not the ones this model was "
                f"fitted with (sha256 {model.extractor.weights_sha256[:12]}... here, "
                f"{state.backbone_weights_sha256[:12]}... in the file); pass the original weights file")
        bank = state.memory_bank
        if bank.ndim != 2 or bank.shape[1] != model.embedding_dim:
            raise ModelFileError(f"{path}: memory bank of shape {tuple(bank.shape)} does not fit backbone "
                                 f"{config.backbone} with embedding size {model.embedding_dim}")
        model.set_state(state)
        return model


# Pixels of one forward pass: large images go through the backbone a few at a time, so the per-batch
# transient (activations, features, their copies) stays bounded (8 images at 900 x 900 took ~2 GB).
# Below it (the MVTec 224 x 224 batch of 8 is 0.4 Mpx) batches are unchanged.
MAX_FORWARD_PIXELS = 4_000_000


def _forward_sized(stack: torch.Tensor) -> list[torch.Tensor]:
    """(B, 3, H, W) -> consecutive parts of at most MAX_FORWARD_PIXELS pixels (at least one image each)."""
    per_part = max(1, MAX_FORWARD_PIXELS // (stack.shape[-2] * stack.shape[-1]))
    return list(stack.split(per_part)) if stack.shape[0] > per_part else [stack]


def _concat_results(parts: list[PatchCoreResult]) -> PatchCoreResult:
    """Results of same-size batches, concatenated (a 4-D tensor input: one size throughout)."""
    if not parts:
        raise InputError("no images to score")

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat([v.cpu() for v in values])

    return PatchCoreResult(cat("scores"), cat("maps"), cat("labels"), cat("masks"))


def _image_result(result: PatchCoreResult, k: int) -> tuple:
    """Image k of a batch result: (score, map, label or None, mask or None), on the CPU."""
    return (result.scores[k].cpu(), result.maps[k].cpu(), None if result.labels is None else result.labels[k].cpu(),
            None if result.masks is None else result.masks[k].cpu())


def _stack_results(per_image: list[tuple]) -> PatchCoreResult:
    """Per-image results in input order -> one PatchCoreResult; maps (and masks) stacked when they share a
    size, else a list."""
    if not per_image:
        raise InputError("no images to score")
    scores, maps, labels, masks = zip(*per_image)
    same = len({m.shape for m in maps}) == 1

    def gather(values):
        if values[0] is None:
            return None
        return torch.stack(values) if same else list(values)

    return PatchCoreResult(torch.stack(scores), gather(maps), None if labels[0] is None else torch.stack(labels),
                           gather(masks))


def _region_size(state: FittedState) -> tuple[int, int] | None:
    return None if state.region is None else tuple(state.region.shape)

