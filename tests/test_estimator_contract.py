"""The estimator's wiring as a contract: PatchCore must equal the pure functions of `core`, composed by
hand here from the config, for fit (bank, distance scale, thresholds) and for predict (scores, maps).

Every config field that changes the method is varied in turn. For each variant the test checks two things:
the estimator matches the oracle built with the varied value, and the oracle built with the default value
is different (so the variant really exercises the field; an estimator that ignored it would fail).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.backbones import build_backbone
from patchcore.core.coreset import coreset_count, greedy_coreset_reference, random_projection
from patchcore.core.features import level_reductions, patch_embeddings
from patchcore.core.knn import nearest, squared_norms
from patchcore.core.scoring import anomaly_maps, reweighted_image_scores, typical_nn_distance
from patchcore.core.thresholds import calibration_split, fold_of_images, quantile_threshold
from patchcore.io.images import as_uint8_tensor, read_image
from patchcore.io.preprocess import Preprocess

BASE = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, coreset_ratio=0.1, batch_size=4, seed=0)
# Each variant changes one field that the method uses; the default for that field is BASE's.
VARIANTS = {
    "patch_size": dict(patch_size=5),
    "feature_strides": dict(feature_strides=(4, 16)),
    "reweight_neighbours": dict(reweight_neighbours=3),
    "reweight_off": dict(reweight_neighbours=0),
    "blur_sigma": dict(blur_sigma=1.5),
    "coreset_ratio": dict(coreset_ratio=0.25),
    "coreset_size": dict(coreset_size=17),
    "calibration_ratio": dict(calibration_ratio=0.25),  # a true hold-out instead of out-of-fold scores
    "false_alarm_rate": dict(false_alarm_rate=0.1),
    "embedding_dim": dict(embedding_dim=96),
    "projection_dim": dict(projection_dim=8),
    "seed": dict(seed=5),
    "resize_crop": dict(resize=72, crop=56),
}


# ---------------------------------------------------------------------------- the oracle
class Oracle:
    """PatchCore composed by hand from the pure functions, following PATCHCORE.md step by step."""

    def __init__(self, config: PatchCoreConfig):
        self.config = config
        self.backbone, spec = build_backbone(config.backbone, config.feature_strides, seed=config.seed)
        self.preprocess = Preprocess(config.resize, config.crop, spec.mean, spec.std)
        self.reductions = level_reductions(self.backbone.channels, config.embedding_dim)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, h*w, D): section 1."""
        return patch_embeddings(self.backbone(self.preprocess(images)), self.reductions, self.config.patch_size)

    def features(self, images: list[torch.Tensor]) -> torch.Tensor:
        step = self.config.batch_size
        return torch.cat([self.embed(torch.stack(images[i:i + step])) for i in range(0, len(images), step)])

    def fit(self, images: list[torch.Tensor]) -> dict:
        cfg = self.config
        bank_images, held_out = calibration_split(images, cfg.calibration_ratio, cfg.seed)
        features = self.features(bank_images)
        owner = torch.arange(len(bank_images)).repeat_interleave(features.shape[1])  # the image of each row
        rows = features.flatten(0, 1)
        generator = torch.Generator().manual_seed(cfg.seed)
        projected = rows @ random_projection(rows.shape[1], cfg.projection_dim, generator)  # psi (section 2)
        projected -= projected.mean(0)
        n = coreset_count(rows.shape[0], cfg.coreset_ratio, cfg.coreset_size)
        selected = greedy_coreset_reference(projected, n, generator=generator)  # the plain O(N^2) algorithm
        bank = rows[selected.sort().values]
        fitted = {"bank": bank, "scale": typical_nn_distance(bank, squared_norms(bank), generator=generator),
                  "n_bank_images": len(bank_images), "image_threshold": None, "pixel_threshold": None}
        if held_out:
            scores, maps = self.predict(fitted, torch.stack(held_out))
        elif len(images) >= 10:  # each image against a coreset bank of the other folds' images (section 5)
            fold = torch.from_numpy(fold_of_images(len(images), 5, cfg.seed))
            scores, maps = torch.zeros(len(images)), None
            # Two stages: each fold's rows to a coreset twice as fine (plain algorithm), then fold f's bank is
            # the coreset of the other folds' finer coresets, with as many rows as their rows would give.
            # (No first stage where the finer ratio would keep half the rows or more.)
            finer, ratio = [], cfg.coreset_ratio if cfg.coreset_size is None else cfg.coreset_size / rows.shape[0]
            for g in range(5):
                members_rows = (fold[owner] == g).nonzero()[:, 0]
                if 2 * ratio < 0.5:
                    chosen = greedy_coreset_reference(projected[members_rows],
                                                      coreset_count(members_rows.numel(), 2 * ratio),
                                                      generator=torch.Generator().manual_seed(cfg.seed + 1 + 5 + g))
                    members_rows = members_rows[chosen]
                finer.append(members_rows)
            for f in range(5):
                pool = torch.cat([finer[g] for g in range(5) if g != f]).sort().values
                count = coreset_count(int((fold[owner] != f).sum()), cfg.coreset_ratio, cfg.coreset_size)
                if count < pool.numel():
                    pool = pool[greedy_coreset_reference(projected[pool], count,
                                                         generator=torch.Generator().manual_seed(cfg.seed + 1 + f))]
                fold_bank = rows[pool.sort().values]
                members = (fold == f).nonzero()[:, 0]
                fold_scores, fold_maps = self.predict(dict(fitted, bank=fold_bank), torch.stack(images)[members])
                scores[members] = fold_scores
                maps = fold_maps.new_zeros(len(images), *fold_maps.shape[1:]) if maps is None else maps
                maps[members] = fold_maps
        else:
            return fitted
        fitted["image_threshold"] = quantile_threshold(scores.tolist(), cfg.false_alarm_rate)
        fitted["pixel_threshold"] = quantile_threshold(maps.flatten(1).amax(1).tolist(), cfg.false_alarm_rate)
        fitted["nominal_scores"] = scores
        return fitted

    def predict(self, fitted: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        features = self.embed(images)
        batch, patches, dim = features.shape
        dist, idx = nearest(features.reshape(-1, dim), fitted["bank"], 1)  # plain exact 1-NN (section 3)
        patch_dist, patch_idx = dist.view(batch, patches), idx.view(batch, patches)
        scores = reweighted_image_scores(features, patch_dist, patch_idx, fitted["bank"],
                                         squared_norms(fitted["bank"]), cfg.reweight_neighbours, fitted["scale"])
        grid = self.backbone(self.preprocess(images[:1]))[0].shape[-2:]
        size = self.preprocess.output_size(*images.shape[-2:])
        return scores, anomaly_maps(patch_dist, tuple(grid), size, cfg.blur_sigma)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def images(train_paths) -> list[torch.Tensor]:
    return [as_uint8_tensor(read_image(p)) for p in train_paths[:12]]


@pytest.fixture(scope="module")
def test_images(category) -> torch.Tensor:
    paths = sorted((category / "test").glob("*/*.png"))[::3]
    return torch.stack([as_uint8_tensor(read_image(p)) for p in paths])


@pytest.fixture(scope="module")
def base(images):
    oracle = Oracle(BASE)
    return oracle, oracle.fit(images)


def _fit_both(config: PatchCoreConfig, images):
    model = PatchCore(config, device="cpu").fit(images)
    oracle = Oracle(config)
    return model, oracle, oracle.fit(images)


def _same_fit(model: PatchCore, fitted: dict) -> bool:
    if model.memory_bank_.shape != fitted["bank"].shape:
        return False
    thresholds_match = all(
        (a is None and b is None) or (a is not None and b is not None and a == pytest.approx(b, rel=1e-4))
        for a, b in ((model.image_threshold_, fitted["image_threshold"]),
                     (model.pixel_threshold_, fitted["pixel_threshold"])))
    return (torch.allclose(model.memory_bank_, fitted["bank"], atol=1e-5)
            and model.distance_scale_ == pytest.approx(fitted["scale"], rel=1e-5)
            and model.n_train_images_ == fitted["n_bank_images"] and thresholds_match)


def _same_predict(result, expected: tuple[torch.Tensor, torch.Tensor]) -> bool:
    scores, maps = expected
    return (result.maps.shape == maps.shape and torch.allclose(result.scores, scores, rtol=1e-4, atol=1e-5)
            and torch.allclose(result.maps, maps, rtol=1e-4, atol=1e-5))


# ---------------------------------------------------------------------------- the contract
def test_the_default_estimator_equals_the_oracle(base, images, test_images):
    oracle, fitted = base
    model = PatchCore(BASE, device="cpu").fit(images)
    assert _same_fit(model, fitted)
    assert _same_predict(model.predict(test_images), oracle.predict(fitted, test_images))
    result = model.predict(test_images)
    assert torch.equal(result.labels, result.scores > fitted["image_threshold"])
    assert torch.equal(result.masks, result.maps > fitted["pixel_threshold"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_method_setting_is_applied_as_configured(variant, base, images, test_images):
    config = dataclasses.replace(BASE, **VARIANTS[variant])
    model, oracle, fitted = _fit_both(config, images)
    base_oracle, base_fitted = base
    expected = oracle.predict(fitted, test_images)
    # The variant matters: the default-setting oracle gives another model or other scores ...
    differs = (not _same_fit(model, base_fitted)
               or not _same_predict(model.predict(test_images), base_oracle.predict(base_fitted, test_images)))
    assert differs, f"{variant}: this test would not notice the setting being ignored"
    # ... and the estimator follows the setting exactly.
    assert _same_fit(model, fitted), f"{variant}: fitted state differs from the oracle's"
    assert _same_predict(model.predict(test_images), expected), f"{variant}: predictions differ from the oracle's"


def test_reweighting_uses_the_fitted_distance_scale(base, images, test_images):
    """eq. 7 with the bank's distance scale T, not raw distances (T = 1 is anomalib's inert softmax)."""
    oracle, fitted = base
    model = PatchCore(BASE, device="cpu").fit(images)
    assert fitted["scale"] != pytest.approx(1.0, rel=0.05)
    inert = dict(fitted, scale=1.0)
    assert not torch.allclose(oracle.predict(inert, test_images)[0], model.predict(test_images).scores, rtol=1e-3)


def test_entry_points_share_one_scoring_core(base, images, test_images, category):
    """predict (paths, arrays, a batch tensor), predict_batch and iter_predict give the same numbers."""
    model = PatchCore(BASE, device="cpu").fit(images)
    paths = sorted((category / "test").glob("*/*.png"))[::3]
    from_tensor = model.predict(test_images)
    from_paths = model.predict(paths)
    from_arrays = model.predict([t.permute(1, 2, 0).numpy() for t in test_images])
    one_pass = model.predict_batch(test_images)
    streamed = torch.cat([b.result.scores for b in model.iter_predict(paths)])
    for other in (from_paths.scores, from_arrays.scores, streamed):
        assert torch.allclose(other, from_tensor.scores, rtol=1e-5)
    assert torch.allclose(one_pass.maps, from_tensor.maps, rtol=1e-5, atol=1e-6)


def test_thresholds_are_each_from_their_own_scores(base):
    """The pixel threshold comes from out-of-sample maps, the image threshold from out-of-sample image scores."""
    _, fitted = base
    assert fitted["pixel_threshold"] != pytest.approx(fitted["image_threshold"], rel=1e-3)


def test_nominal_scores_are_out_of_sample(base, images):
    """Every training image is in the bank, yet its calibration score is the oracle's out-of-fold score, well
    above what the same image scores against the whole bank (in-sample, it finds its own patches)."""
    _, fitted = base
    model = PatchCore(BASE, device="cpu").fit(images)
    assert model.n_train_images_ == len(images) and model.fit_report_.n_calibration_images == len(images)
    out_of_fold = torch.tensor(model.calibration_scores_, dtype=torch.float64)
    assert torch.allclose(out_of_fold, fitted["nominal_scores"].double(), rtol=1e-4)
    in_sample = model.predict(images).scores
    assert bool((out_of_fold > in_sample.double() * 1.05).all())


def test_concurrent_predict_from_threads_equals_single_threaded(images, category):
    model = PatchCore(BASE, device="cpu").fit(images)
    paths = sorted((category / "test").glob("*/*.png"))
    expected = {str(p): float(s) for p, s in zip(paths, model.predict(paths).scores)}
    results: dict[str, list[float]] = {str(p): [] for p in paths}
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for round_ in range(3):
                mine = paths[(offset + round_) % 4::4]
                for path, score in zip(mine, model.predict(mine).scores):
                    results[str(path)].append(float(score))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for path, scores in results.items():
        assert scores and all(s == pytest.approx(expected[path], rel=1e-5) for s in scores), path


def test_a_state_swap_during_concurrent_predicts_gives_one_state_or_the_other(images, test_images):
    """The server swaps an updated model in while requests run: each result comes from one state."""
    model = PatchCore(BASE, device="cpu").fit(images)
    old = model.state_
    new = old.replace(memory_bank=old.memory_bank[: old.memory_bank.shape[0] // 2].clone())
    before = model.predict(test_images).scores
    after = PatchCore(BASE, device="cpu").set_state(new).predict(test_images).scores
    assert not torch.allclose(before, after)
    seen, stop = [], threading.Event()

    def work() -> None:
        while not stop.is_set() and len(seen) < 200:
            seen.append(model.predict(test_images).scores)

    thread = threading.Thread(target=work)
    thread.start()
    for i in range(6):
        model.set_state(new if i % 2 == 0 else old)
        time.sleep(0.03)  # let predicts run across the swaps
    stop.set()
    thread.join(timeout=120)
    assert seen
    for scores in seen:
        assert torch.allclose(scores, before, rtol=1e-5) or torch.allclose(scores, after, rtol=1e-5)


def test_batch_size_sets_the_images_per_forward_pass(images):
    """batch_size does not change the method, but it is read: it sets how many images share a pass."""
    config = dataclasses.replace(BASE, batch_size=3, calibration_ratio=0.0)
    model = PatchCore(config, device="cpu")
    backbone = model.backbone
    sizes = []
    forward = backbone.forward
    backbone.forward = lambda x: sizes.append(x.shape[0]) or forward(x)
    model.fit(images[:7])
    assert sizes == [3, 3, 1]
    sizes.clear()
    model.predict(images[:5])
    assert sizes == [3, 2]
