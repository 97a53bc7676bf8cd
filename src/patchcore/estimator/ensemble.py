"""Ensembles of PatchCore models (paper, section 4.4.1): one memory bank per backbone, each member's scores
normalised, then averaged. One model file holds every member.

The paper averages the members' normalised scores; the authors' code normalised each member by the min and
max of the *test set's* scores, so the test set decided the scale. Here each member is normalised with
statistics of its training images only: image scores by the member's out-of-sample nominal image scores
(`calibration_scores_`, the ones fit sets its thresholds from), maps by its out-of-sample nominal maps (each
training image scored against the member's bank without the rows that came from that image). The statistics
are the median and the MAD (x 1.4826, a standard deviation for normal data): real "good" sets hold a few parts
that are not quite good, and one such image moves a mean/std (or a min/max) but not a median/MAD (breakdown
50%). Then, as the paper: s = mean_k (s_k - location_k) / scale_k, and the same per pixel.

The ensemble's decision thresholds come from the combined nominal scores (never test images): the (1 -
false_alarm_rate) quantile of the normal through their median and 95th percentile (the single model's rule,
core/thresholds.py, without its log: combined scores are centred averages and can be negative).

Members must share the geometry (resize, crop, scale, region: the maps are at the model input and must
align); images of any size work as for one model. Ensembles are scored by torch (no ONNX export).
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
import torch

from .._version import __version__
from ..config import PatchCoreConfig
from ..core.coreset_update import UpdateReport
from ..core.knn import nearest
from ..errors import ConfigError, InputError, ModelFileError, NotFittedError
from ..io.model_file import ENSEMBLE_FORMAT_NAME, read_model_file, read_model_format, write_model_file
from .inputs import ImageInput, as_image_list
from .model import (
    DEFAULT_MAX_FEATURE_MEMORY,
    FitReport,
    PatchCore,
    PatchCoreResult,
    PredictedBatch,
    _concat_results,
    _region_size,
    _stack_results,
    resolve_device,
)
from .state import FittedState

MAD_TO_SIGMA = 1.4826  # MAD of normal data times this is its standard deviation
BOOTSTRAP_ROUNDS = 400
UPPER_QUANTILE = 0.95  # the second point the thresholds' normal goes through (the median is the first)
DEFAULT_FALSE_ALARM_RATE = 0.01  # for configs from before false_alarm_rate
MAX_MEMBERS = 8
# Config fields every member must share: they decide the model input geometry (maps must align) and which
# training images are scored for calibration (the members' nominal scores must be of the same images).
SHARED_FIELDS = ("resize", "crop", "scale", "geometry", "pixel_budget", "region", "calibration_ratio", "seed",
                 "false_alarm_rate")
PIXEL_SAMPLE = 2048  # nominal pixels per training image and member kept for the pixel statistics (seeded)
POOLED_SIDE = 256  # nominal maps kept for the pixel threshold are max-pooled to at most this side
# A bank row within this share of T (eq. 7's distance scale) of a patch of the image being scored is that
# image's own row (bank rows are copies of training patch features; features recomputed in other batches differ
# by float rounding only, far below this).
OWN_ROW_TOLERANCE = 1e-3


def split_backbones(backbone: str) -> list[str]:
    """'efficientnet_lite0,efficientnet_lite1' -> the members' backbones (one name: a single model)."""
    return [name.strip() for name in backbone.split(",")]


def is_ensemble_config(config: PatchCoreConfig) -> bool:
    return len(split_backbones(config.backbone)) > 1


def build_model(config: PatchCoreConfig, *, device: str | torch.device = "auto") -> PatchCore | PatchCoreEnsemble:
    """An unfitted model for `config`: an ensemble when config.backbone names several backbones (a,b,c)."""
    return PatchCoreEnsemble(config, device=device) if is_ensemble_config(config) else PatchCore(config, device=device)


def load_model(path: str | Path, *, device: str | torch.device = "auto",
               weights: str | None = None) -> PatchCore | PatchCoreEnsemble:
    """Load a model file of either kind (a single model or an ensemble): what applications call."""
    if read_model_format(path) == ENSEMBLE_FORMAT_NAME:
        return PatchCoreEnsemble.load(path, device=device, weights=weights)
    return PatchCore.load(path, device=device, weights=weights)


# ---------------------------------------------------------------------------- normalisation (pure)
@dataclass(frozen=True)
class Normaliser:
    """x -> (x - location) / scale, location and scale from nominal training values only."""

    location: float
    scale: float

    @classmethod
    def fit(cls, values) -> Normaliser:
        return cls(*robust_location_scale(values))

    def __call__(self, x):
        return (x - self.location) / self.scale


def robust_location_scale(values) -> tuple[float, float]:
    """(median, 1.4826 MAD) of finite values; the standard deviation where the MAD is 0 (half the values
    equal), and |median| (or 1) where every value is equal, so the scale is always positive."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError("no finite nominal values to normalise with")
    location = float(np.median(v))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(v - location)))
    if not scale > 0:
        scale = float(np.std(v))
    if not scale > 0:
        scale = abs(location) or 1.0
    return location, scale


def combine(values: Sequence, normalisers: Sequence[Normaliser]):
    """mean_k normaliser_k(values_k): the paper's average of normalised member scores (or maps)."""
    if len(values) != len(normalisers):
        raise ValueError(f"{len(values)} members' values for {len(normalisers)} normalisers")
    shapes = {tuple(getattr(v, "shape", ())) for v in values}
    if len(shapes) > 1:
        raise RuntimeError(f"the members' maps do not align: shapes {sorted(shapes)}")
    total = normalisers[0](values[0])
    for value, normaliser in zip(values[1:], normalisers[1:]):
        total = total + normaliser(value)
    return total / len(values)


def tail_location_scale(values) -> tuple[float, float]:
    """(mu, sigma) of the normal through the median and the 95th percentile: nominal scores have a heavier upper
    tail than a normal through their middle (the MAD), as core/thresholds.py measured for single models; the
    95th percentile moves little when a few percent of the set are bad parts. MAD, then std, where it is flat."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError("no finite nominal values to set a threshold from")
    location, upper = (float(x) for x in np.quantile(v, [0.5, UPPER_QUANTILE]))
    scale = (upper - location) / NormalDist().inv_cdf(UPPER_QUANTILE)
    return location, scale if scale > 0 else robust_location_scale(v)[1]


def normal_quantile_threshold(scores, false_alarm_rate: float) -> float:
    """The (1 - rate) quantile of combined nominal scores under the normal through their median and 95th
    percentile (the single model's rule without the log: combined scores are centred and can be negative)."""
    location, scale = tail_location_scale(scores)
    return location + NormalDist().inv_cdf(1.0 - false_alarm_rate) * scale


@dataclass(frozen=True)
class EnsembleState:
    """What the ensemble learns beyond its members: per member an image and a pixel normaliser, and the
    decision thresholds on the combined scales with the combined nominal scores they came from."""

    image: tuple[Normaliser, ...]
    pixel: tuple[Normaliser, ...]
    image_threshold: float | None
    pixel_threshold: float | None
    calibration_scores: tuple[float, ...]  # combined out-of-sample nominal image scores
    pixel_calibration: tuple[float, ...]  # each training image's largest combined nominal pixel score

    def header(self) -> dict[str, Any]:
        return {"normalisation": "median_mad", "combination": "mean",
                "image": [[n.location, n.scale] for n in self.image],
                "pixel": [[n.location, n.scale] for n in self.pixel],
                "image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "calibration_scores": list(self.calibration_scores),
                "pixel_calibration": list(self.pixel_calibration)}

    @classmethod
    def from_header(cls, value: Any, members: int, path: Any) -> EnsembleState:
        """Checked: every number finite, every scale positive, one normaliser per member."""
        def bad(field: str, problem: str) -> ModelFileError:
            return ModelFileError(f"{path}: invalid ensemble model file: field ensemble.{field}: {problem}")

        if not isinstance(value, dict):
            raise bad("", "missing or not a JSON object")
        for name, expected in (("normalisation", "median_mad"), ("combination", "mean")):
            if value.get(name) != expected:
                raise bad(name, f"must be {expected!r} (what this patchcore computes), got {value.get(name)!r}")

        def number(x: Any, field: str) -> float:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise bad(field, f"must be a finite number, got {x!r}")
            return float(x)

        def normalisers(field: str) -> tuple[Normaliser, ...]:
            items = value.get(field)
            if not isinstance(items, list) or len(items) != members:
                raise bad(field, f"must be a list of {members} [location, scale] pairs")
            out = []
            for k, item in enumerate(items):
                if not isinstance(item, list) or len(item) != 2:
                    raise bad(f"{field}[{k}]", f"must be [location, scale], got {item!r}")
                location, scale = number(item[0], f"{field}[{k}]"), number(item[1], f"{field}[{k}]")
                if scale <= 0:
                    raise bad(f"{field}[{k}]", f"scale must be positive, got {scale}")
                out.append(Normaliser(location, scale))
            return tuple(out)

        def numbers(field: str) -> tuple[float, ...]:
            items = value.get(field, [])
            if not isinstance(items, list) or len(items) > 1 << 20:
                raise bad(field, "must be a list of at most 2^20 numbers")
            return tuple(number(x, field) for x in items)

        thresholds = {name: None if value.get(name) is None else number(value.get(name), name)
                      for name in ("image_threshold", "pixel_threshold")}
        return cls(normalisers("image"), normalisers("pixel"), thresholds["image_threshold"],
                   thresholds["pixel_threshold"], numbers("calibration_scores"), numbers("pixel_calibration"))


# ---------------------------------------------------------------------------- out-of-sample nominal maps
class _WithoutOwnRows:
    """Stands in for a member's BankIndex while its training images are scored: each image's patches are
    searched in the bank without the rows that came from that image (its own rows are the ones some patch
    of it lies on, within `tolerance`), so the scores are out of sample as fit's calibration scores are.
    The queries of one search are `images` equal blocks, one per image (PatchCore._score_stack's layout)."""

    def __init__(self, index, bank: torch.Tensor, tolerance: float, images: int):
        self.index, self.bank, self.tolerance, self.images = index, bank, tolerance, images
        self.excluded = 0  # own rows left out, over all searches (tests check it)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist, idx = self.index.search(queries)
        dist, idx = dist.clone(), idx.clone()
        per_image = queries.shape[0] // self.images
        for b in range(self.images):
            rows = slice(b * per_image, (b + 1) * per_image)
            own = torch.unique(idx[rows][dist[rows] <= self.tolerance])
            if own.numel() == 0:
                continue
            if own.numel() >= self.bank.shape[0]:
                raise InputError("every bank row came from one training image: nothing to score it against")
            keep = torch.ones(self.bank.shape[0], dtype=torch.bool, device=self.bank.device)
            keep[own] = False
            kept = torch.nonzero(keep).squeeze(1)
            d, i = nearest(queries[rows], self.bank[kept], 1)
            dist[rows], idx[rows] = d[:, 0], kept[i[:, 0]]
            self.excluded += int(own.numel())
        return dist, idx


@dataclass
class NominalPass:
    """Per member: out-of-sample image scores of every training image, a seeded sample of its nominal
    pixel scores, and each image's nominal map (max-pooled to at most POOLED_SIDE)."""

    names: list[str]  # the training images, in the order of the scores and maps
    scores: list[list[float]]
    pixels: list[list[np.ndarray]]
    maps: list[list[torch.Tensor]]
    excluded_rows: list[int]


def nominal_pass(members: Sequence[PatchCore], images: list, *, seed: int = 0) -> NominalPass:
    """Score every training image with every member against that member's bank without the image's own rows.
    Images are decoded and grouped once (members share the geometry)."""
    fitted = [m._checked_fitted() for m in members]
    generator = torch.Generator().manual_seed(seed)
    region = fitted[0].state.region  # shared (checked); outside it maps are 0 by construction, not nominal evidence
    inside = None if region is None else torch.nonzero(region.cpu().flatten()).squeeze(1)
    out = NominalPass([], [[] for _ in members], [[] for _ in members], [[] for _ in members], [0] * len(members))
    done = 0
    for batch, groups in members[0]._iter_groups(images, _region_size(fitted[0].state)):
        for group in groups:
            out.names += [str(batch.paths[p]) if batch.paths else f"#{done + p}" for p in group.positions]
            count = group.stack.shape[0]
            picks = None
            for k, (member, f) in enumerate(zip(members, fitted)):
                index = _WithoutOwnRows(f.index, f.state.memory_bank,
                                        OWN_ROW_TOLERANCE * f.state.distance_scale, count)
                result = member._score_stack(group.stack, dataclasses.replace(f, index=index),
                                             at_input=group.at_input)
                out.excluded_rows[k] += index.excluded
                maps = result.maps.float().cpu()
                out.scores[k] += result.scores.cpu().tolist()
                flat = maps.flatten(1)
                if picks is None:  # the same pixels for every member
                    if inside is not None and inside.numel() and int(inside[-1]) < flat.shape[1]:
                        picks = inside[torch.randint(inside.numel(), (min(PIXEL_SAMPLE, inside.numel()),),
                                                     generator=generator)]
                    else:
                        picks = torch.randint(flat.shape[1], (min(PIXEL_SAMPLE, flat.shape[1]),), generator=generator)
                out.pixels[k].append(flat[:, picks].numpy().ravel())
                height, width = maps.shape[-2:]
                pooled = torch.nn.functional.adaptive_max_pool2d(
                    maps[:, None], (min(height, POOLED_SIDE), min(width, POOLED_SIDE)))[:, 0]
                out.maps[k] += list(pooled)
        done += len(batch.images)
    return out


class ExpectedFalseAlarms(NamedTuple):
    """The share of good parts a threshold flags, expected from nominal scores, with a 90% interval."""

    rate: float
    low: float
    high: float
    n: int


class MemberBanks(tuple):
    """The members' memory banks, in order; `.shape` = (rows in all, 'D1+D2+...')."""

    @property
    def shape(self) -> tuple[int, str]:
        return sum(b.shape[0] for b in self), "+".join(str(b.shape[1]) for b in self)


# ---------------------------------------------------------------------------- the estimator
class PatchCoreEnsemble:
    """Several PatchCore models (one per backbone) scored as one: PatchCoreResult as a single model gives,
    on the combined (normalised) scales. `config.backbone` names the members: 'a,b,c'."""

    def __init__(self, config: PatchCoreConfig, *, device: str | torch.device = "auto"):
        backbones = split_backbones(config.backbone)
        if not 2 <= len(backbones) <= MAX_MEMBERS or not all(backbones):
            raise ConfigError(f"an ensemble takes 2 to {MAX_MEMBERS} comma-separated backbones, got "
                              f"{config.backbone!r}")
        if config.weights is not None:
            raise ConfigError("--weights names one backbone's file; an ensemble reads each backbone's weights "
                              "from its standard source")
        self.device = resolve_device(device)
        self.members = [PatchCore(dataclasses.replace(config, backbone=name), device=self.device)
                        for name in backbones]
        self._state: EnsembleState | None = None
        self._scoring: tuple | None = None  # (members' _Fitted, EnsembleState): what predicts read, swapped whole

    @classmethod
    def from_members(cls, members: Sequence[PatchCore]) -> PatchCoreEnsemble:
        """An ensemble of given (fitted or not) models; `calibrate` then sets its normalisation."""
        if not 2 <= len(members) <= MAX_MEMBERS:
            raise ConfigError(f"an ensemble takes 2 to {MAX_MEMBERS} members, got {len(members)}")
        ensemble = cls.__new__(cls)
        ensemble.device, ensemble.members = members[0].device, list(members)
        ensemble._state = ensemble._scoring = None
        return ensemble

    # ---- what a single model offers, on the ensemble
    @property
    def config(self) -> PatchCoreConfig:
        """The first member's config with every member's backbone (a,b,c): what fit chose, for reports."""
        return dataclasses.replace(self.members[0].config, weights=None,
                                   backbone=",".join(m.config.backbone for m in self.members))

    @property
    def preprocess(self):
        return self.members[0].preprocess  # shared geometry (checked)

    def maps_at_original_size(self, maps: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.members[0].maps_at_original_size(maps, original_size)

    def _install(self, state: EnsembleState) -> None:
        """The ensemble state and the members' current fitted states, as one snapshot for predicts: a
        concurrent predict sees the old ensemble or the new one (an update of every member), never a mix."""
        self._state = state
        self._scoring = ([m._checked_fitted() for m in self.members], state)

    def _checked_state(self) -> EnsembleState:
        if self._state is None:
            raise NotFittedError("this PatchCore ensemble is not fitted yet: call fit() or load_model()")
        return self._state

    ensemble_state_ = property(lambda self: self._checked_state())
    image_threshold_ = property(lambda self: self._checked_state().image_threshold)
    pixel_threshold_ = property(lambda self: self._checked_state().pixel_threshold)
    calibration_scores_ = property(lambda self: list(self._checked_state().calibration_scores))
    input_size_ = property(lambda self: self.members[0].input_size_)
    grid_ = property(lambda self: self.members[0].grid_)
    n_train_images_ = property(lambda self: self.members[0].n_train_images_)

    @property
    def memory_bank_(self) -> MemberBanks:
        """The members' banks (each member scores against its own); `.shape` = (rows in all, 'D1+D2+...')
        for size reports."""
        self._checked_state()
        return MemberBanks(m.memory_bank_ for m in self.members)

    def expected_false_alarms(self, threshold: float | None = None) -> ExpectedFalseAlarms:
        """The share of good parts above `threshold` (default: the image threshold) under the normal model of
        the combined nominal scores the threshold came from, with a 90% bootstrap interval."""
        state = self._checked_state()
        threshold = state.image_threshold if threshold is None else threshold
        scores = np.asarray(state.calibration_scores, dtype=np.float64)
        if threshold is None or scores.size < 2:
            raise InputError("an expected false-alarm rate needs a threshold and at least two nominal scores")

        def rate(sample) -> float:
            location, scale = tail_location_scale(sample)
            return 1.0 - NormalDist(location, scale).cdf(threshold)

        rng = np.random.default_rng(self.members[0].config.seed)
        rounds = [rate(scores[rng.integers(0, scores.size, scores.size)]) for _ in range(BOOTSTRAP_ROUNDS)]
        low, high = np.quantile(rounds, [0.05, 0.95])
        return ExpectedFalseAlarms(rate(scores), float(low), float(high), int(scores.size))

    @property
    def state_(self) -> tuple:
        """(member states, ensemble state): swapped back as a whole by set_state (the server's rollback)."""
        return tuple(m.state_ for m in self.members), self._checked_state()

    def set_state(self, state: tuple) -> PatchCoreEnsemble:
        members, ensemble = state
        for member, member_state in zip(self.members, members):
            member.set_state(member_state)
        self._install(ensemble)
        return self

    def with_thresholds(self, *, image: float | None = None, pixel: float | None = None) -> PatchCoreEnsemble:
        """Override the decision thresholds on the combined scales; None keeps the current one."""
        state = self._checked_state()
        for name, value in (("image", image), ("pixel", pixel)):
            if value is not None and not math.isfinite(float(value)):
                raise InputError(f"the {name} threshold must be a finite number, got {value}")
        changes = {k: float(v) for k, v in (("image_threshold", image), ("pixel_threshold", pixel)) if v is not None}
        self._install(dataclasses.replace(state, **changes))
        return self

    # ---- fit
    def fit(self, images: Sequence[ImageInput], *, progress: Callable[[float], None] | None = None,
            max_feature_memory: int = DEFAULT_MAX_FEATURE_MEMORY, spill_dir: str | Path | None = None
            ) -> PatchCoreEnsemble:
        """Fit every member on the same images (each its own bank and thresholds), then the normalisation."""
        images = as_image_list(images)
        share = None if progress is None else (lambda n: progress(n / len(self.members)))
        for member in self.members:
            member.fit(images, progress=share, max_feature_memory=max_feature_memory, spill_dir=spill_dir)
        return self.calibrate(images)

    def calibrate(self, images: Sequence[ImageInput]) -> PatchCoreEnsemble:
        """Normalisation and thresholds from the training images of the fitted members (never test images)."""
        started = time.perf_counter()
        images = as_image_list(images)
        self.check_members()
        members = self.members
        nominal = nominal_pass(members, images, seed=members[0].config.seed)
        pixel = tuple(Normaliser.fit(np.concatenate(p)) for p in nominal.pixels)
        calibration = [m.calibration_scores_ for m in members]
        if len({len(c) for c in calibration}) == 1 and len(calibration[0]) >= 2:
            image_scores = calibration  # fit's out-of-sample nominal scores, of the same images for every member
        else:  # fewer than fit calibrates on: the pass's own out-of-sample scores
            image_scores = nominal.scores
        image = tuple(Normaliser.fit(s) for s in image_scores)
        combined = [float(x) for x in combine([torch.tensor(s, dtype=torch.float64) for s in image_scores], image)]
        pixel_max = [float(combine([nominal.maps[k][i] for k in range(len(members))], pixel).max())
                     for i in range(len(nominal.maps[0]))]
        rate = getattr(members[0].config, "false_alarm_rate", DEFAULT_FALSE_ALARM_RATE)
        calibrated = all(m.image_threshold_ is not None for m in members)
        self._install(EnsembleState(
            image, pixel,
            normal_quantile_threshold(combined, rate) if calibrated else None,
            normal_quantile_threshold(pixel_max, rate) if calibrated else None,
            tuple(combined), tuple(pixel_max)))
        self.excluded_rows_ = nominal.excluded_rows
        report = self._fit_report(time.perf_counter() - started)
        threshold = self._state.image_threshold
        if threshold is not None and len(combined) == len(nominal.names) and hasattr(report, "suspects"):
            # training images that score like defects for the ensemble (fit's nominal scores are of every
            # training image in the pass's order when their counts agree)
            report.suspects = sorted(((name, s) for name, s in zip(nominal.names, combined) if s > threshold),
                                     key=lambda item: -item[1])
        self.fit_report_ = report
        return self

    def _fit_report(self, normalisation_seconds: float) -> FitReport:
        """The members' reports summed (times, patches, bank rows); the normalisation pass counts as calibration."""
        reports = [getattr(m, "fit_report_", None) or FitReport() for m in self.members]
        first = reports[0]
        report = FitReport(
            n_images=first.n_images, n_calibration_images=first.n_calibration_images,
            n_patches=sum(r.n_patches for r in reports), coreset_size=sum(r.coreset_size for r in reports),
            embed_seconds=sum(r.embed_seconds for r in reports),
            coreset_seconds=sum(r.coreset_seconds for r in reports),
            calibration_seconds=sum(r.calibration_seconds for r in reports) + normalisation_seconds,
            features_spilled_to_disk=any(r.features_spilled_to_disk for r in reports), skipped=list(first.skipped),
            geometry=first.geometry)
        if hasattr(report, "thresholds"):
            state = self._state
            report.thresholds = (
                f"for the ensemble of {len(self.members)}: the normal (1 - false_alarm_rate) quantile of "
                f"{len(state.calibration_scores)} combined out-of-sample nominal scores (a normal through their "
                f"median and 95th percentile)")
        return report

    def check_members(self, path: Any = None) -> None:
        """The members must be fitted and share the geometry and the calibration images; else an error naming
        what differs (ConfigError, or ModelFileError for a file)."""
        error = ConfigError if path is None else ModelFileError
        where = "" if path is None else f"{path}: "
        for k, member in enumerate(self.members):
            if member._fitted is None:
                raise NotFittedError(f"ensemble member {k} ({member.config.backbone}) is not fitted")
        first = self.members[0]
        for member in self.members[1:]:
            for name in SHARED_FIELDS:
                a, b = getattr(first.config, name, None), getattr(member.config, name, None)
                if a != b:
                    raise error(f"{where}ensemble members disagree on {name}: {a!r} ({first.config.backbone}) vs "
                                f"{b!r} ({member.config.backbone}); members must share the geometry")
            for name in ("input_size_", "n_train_images_"):
                if getattr(first, name) != getattr(member, name):
                    raise error(f"{where}ensemble members disagree on {name.rstrip('_')}: {getattr(first, name)} vs "
                                f"{getattr(member, name)}")
            regions = first.state_.region, member.state_.region
            if (regions[0] is None) != (regions[1] is None) or (
                    regions[0] is not None and not torch.equal(regions[0].cpu(), regions[1].cpu())):
                raise error(f"{where}ensemble members have different inspection regions")

    # ---- predict
    def _combine(self, results: list[PatchCoreResult], state: EnsembleState) -> PatchCoreResult:
        scores = combine([r.scores.float().cpu() for r in results], state.image)
        maps = combine([r.maps.float().cpu() for r in results], state.pixel)
        labels = None if state.image_threshold is None else scores > state.image_threshold
        masks = None if state.pixel_threshold is None else maps > state.pixel_threshold
        return PatchCoreResult(scores, maps, labels, masks)

    def _score_groups(self, groups, fitted: list, state: EnsembleState) -> list[tuple]:
        """One batch's groups (decoded and grouped once) -> (score, map, label, mask) per image, in order."""
        per_image: list = [None] * sum(len(g.positions) for g in groups)
        for group in groups:
            results = [m._score_stack(group.stack, f, at_input=group.at_input) for m, f in zip(self.members, fitted)]
            result = self._combine(results, state)
            for k, position in enumerate(group.positions):
                per_image[position] = (result.scores[k], result.maps[k],
                                       None if result.labels is None else result.labels[k],
                                       None if result.masks is None else result.masks[k])
        return per_image

    def _snapshot(self) -> tuple[list, EnsembleState]:
        self._checked_state()
        return self._scoring  # one snapshot per call, as a single model reads its _Fitted once

    def predict_batch(self, images: torch.Tensor) -> PatchCoreResult:
        """Score one uint8 (B, 3, H, W) batch in a single pass per member (the serving path)."""
        fitted, state = self._snapshot()
        self.members[0]._check_input(*images.shape[-2:], _region_size(fitted[0].state))
        return self._combine([m._score_stack(images, f) for m, f in zip(self.members, fitted)], state)

    def predict(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> PatchCoreResult:
        """As PatchCore.predict: one image or many, of any sizes (maps as a list when sizes differ)."""
        fitted, state = self._snapshot()
        first = self.members[0]
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            first._check_input(*images.shape[-2:], _region_size(fitted[0].state))
            step = first.config.batch_size
            return _concat_results([self._combine([m._score_stack(images[i:i + step], f)
                                                   for m, f in zip(self.members, fitted)], state)
                                    for i in range(0, images.shape[0], step)])
        per_image: list[tuple] = []
        for batch, groups in first._iter_groups(as_image_list(images), _region_size(fitted[0].state)):
            if batch.failures:
                raise batch.failures[0]
            per_image += self._score_groups(groups, fitted, state)
        return _stack_results(per_image)

    def iter_predict(self, paths: Sequence[str | Path]) -> Iterator[PredictedBatch]:
        """As PatchCore.iter_predict: unreadable files in `failures`, each file decoded once for every member."""
        fitted, state = self._snapshot()
        for batch, groups in self.members[0]._iter_groups(as_image_list(paths), _region_size(fitted[0].state)):
            result = _stack_results(self._score_groups(groups, fitted, state)) if groups else None
            yield PredictedBatch(batch.paths, result, batch.failures, batch.images)

    # ---- incremental update
    def update(self, images: Sequence[ImageInput], *, max_new: int | None = None,
               radius: float | None = None) -> PatchCoreEnsemble:
        """Every member's update (PatchCore.update; `radius` defaults to each member's own T). The normalisation
        and the thresholds are kept, as a single model keeps its thresholds. All or none: a failing member
        puts every member back."""
        previous = self.state_
        reports = []
        try:
            for member in self.members:
                member.update(images, max_new=max_new, radius=radius)
                reports.append(member.update_report_)
        except BaseException:
            self.set_state(previous)
            raise
        self._install(self._state)  # every member's new bank at once
        first = reports[0]
        self.update_reports_ = reports
        self.update_report_ = UpdateReport(
            bank_before=sum(r.bank_before for r in reports), bank_after=sum(r.bank_after for r in reports),
            n_images=first.n_images, n_patches=sum(r.n_patches for r in reports), skipped=list(first.skipped),
            radius=max(r.radius for r in reports), stopped_by=first.stopped_by,
            initial_radius=max(r.initial_radius for r in reports),
            covering_radius=max(r.covering_radius for r in reports), seconds=sum(r.seconds for r in reports))
        return self

    # ---- persistence
    def save(self, path: str | Path) -> None:
        """One safetensors file: member k's tensors as 'member<k>.<name>', its single-model header in the JSON
        list 'members', the normalisation and thresholds in 'ensemble'. No pickle, as a single model."""
        state = self._checked_state()
        tensors, headers = {}, []
        for k, member in enumerate(self.members):
            member_tensors, header = member.file_parts()
            tensors.update({f"member{k}.{name}": value for name, value in member_tensors.items()})
            headers.append(header)
        write_model_file(path, tensors, {"package_version": __version__, "config": self.config.to_dict(),
                                         "members": headers, "ensemble": state.header()},
                         format_name=ENSEMBLE_FORMAT_NAME)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "auto",
             weights: str | None = None) -> PatchCoreEnsemble:
        """Rebuild a saved ensemble; each member is checked as a single model file would be (schema, bounds,
        backbone weights), before any bank is read where the header alone refutes it."""
        if weights is not None:
            raise InputError("--weights names one backbone's file; an ensemble reads each member's weights from "
                             "its standard source")
        built: list[PatchCore] = []

        def check_header(shapes: dict, header: dict) -> None:
            members = header.get("members")
            if not isinstance(members, list) or not 2 <= len(members) <= MAX_MEMBERS:
                raise ModelFileError(f"{path}: invalid ensemble model file: field members: must be a list of 2 to "
                                     f"{MAX_MEMBERS} member headers")
            known = set()
            for k, member_header in enumerate(members):
                if not isinstance(member_header, dict):
                    raise ModelFileError(f"{path}: invalid ensemble model file: members[{k}] is not a JSON object")
                member_shapes = _member_entries(shapes, k, f"{path} (member {k})")
                known |= {f"member{k}.{name}" for name in member_shapes}
                built.append(PatchCore.from_file_header(member_shapes, member_header, f"{path} (member {k})",
                                                        device=device))
            unexpected = sorted(set(shapes) - known)
            if unexpected:
                raise ModelFileError(f"{path}: invalid ensemble model file: unexpected tensors {unexpected}")

        tensors, header = read_model_file(path, check_header=check_header, format_name=ENSEMBLE_FORMAT_NAME)
        for k, (member, member_header) in enumerate(zip(built, header["members"])):
            prefix = f"member{k}."
            member.install_file_state({name[len(prefix):]: value for name, value in tensors.items()
                                       if name.startswith(prefix)}, member_header, f"{path} (member {k})")
        ensemble = cls.from_members(built)
        ensemble.check_members(path)
        ensemble._install(EnsembleState.from_header(header.get("ensemble"), len(built), path))
        return ensemble


def _member_entries(shapes: dict, k: int, where: str) -> dict:
    """Member k's tensor entries (prefix removed), checked against the single-model schema."""
    prefix = f"member{k}."
    entries = {name[len(prefix):]: entry for name, entry in shapes.items() if name.startswith(prefix)}
    schema = {**FittedState.TENSORS, **FittedState.OPTIONAL_TENSORS}
    for name, (dtype, ndim) in schema.items():
        if name not in entries:
            if name in FittedState.TENSORS:
                raise ModelFileError(f"{where}: invalid model file: tensor {name!r} is missing")
            continue
        got_dtype, shape = entries[name]
        if got_dtype != dtype or len(shape) != ndim:
            raise ModelFileError(f"{where}: invalid model file: tensor {name!r} must be {ndim}-D {dtype}, got "
                                 f"{len(shape)}-D {got_dtype} of shape {shape}")
    unexpected = sorted(set(entries) - set(schema))
    if unexpected:
        raise ModelFileError(f"{where}: invalid model file: unexpected tensors {unexpected}")
    return entries


__all__ = ["EnsembleState", "Normaliser", "PatchCoreEnsemble", "build_model", "combine",
           "is_ensemble_config", "load_model", "normal_quantile_threshold", "robust_location_scale"]
