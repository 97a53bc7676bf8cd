"""Thresholds that mean a false-alarm rate (core/thresholds.py), set by fit from every training image, and the
training images that score like defects listed by name."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCore, PatchCoreConfig
from patchcore.app.cli import main
from patchcore.core.thresholds import expected_false_alarms, fold_of_images, quantile_threshold
from patchcore.evaluation.synthetic import fabric_texture, paste_defect


def test_the_quantile_of_a_log_normal_by_hand():
    # logs 0, 1, ..., 20 + log 10: median log 10 + 10, 95th percentile (numpy's linear rule) log 10 + 19, so
    # sigma = 9 / z_0.95 and the 1% threshold is 10 * exp(10 + z_0.99 * 9 / z_0.95)
    scores = 10 * np.exp(np.arange(21.0))
    expected = 10 * math.exp(10 + NormalDist().inv_cdf(0.99) * 9 / NormalDist().inv_cdf(0.95))
    assert quantile_threshold(scores, 0.01) == pytest.approx(expected, rel=1e-9)


def test_the_threshold_hits_its_rate_on_nominal_scores():
    rng = np.random.default_rng(0)
    train, new = rng.lognormal(3.0, 0.2, 400), rng.lognormal(3.0, 0.2, 200_000)
    for rate in (0.01, 0.05):
        observed = float(np.mean(new > quantile_threshold(train, rate)))
        assert rate / 2 < observed < 2 * rate, rate


def test_a_few_bad_parts_among_the_good_barely_move_it():
    """2.5% of the 'good' training images are defects scoring 3x higher: the estimate moves 10%, where
    mean + 3 std (the previous rule) moves by almost half and the empirical 99% quantile doubles."""
    rng = np.random.default_rng(1)
    clean = rng.lognormal(3.0, 0.15, 200)
    dirty = np.concatenate([clean[:195], 3 * clean[195:]])
    robust = quantile_threshold(dirty, 0.01) / quantile_threshold(clean, 0.01)
    old = (dirty.mean() + 3 * dirty.std()) / (clean.mean() + 3 * clean.std())
    empirical = np.quantile(dirty, 0.99) / np.quantile(clean, 0.99)
    assert robust < 1.15 and old > 1.4 and empirical > 2


def test_the_expected_rate_and_its_interval_narrow_with_more_images():
    rng = np.random.default_rng(2)
    widths = []
    for n in (20, 500):
        scores = rng.lognormal(2.0, 0.3, n)
        estimate = expected_false_alarms(scores, quantile_threshold(scores, 0.01), seed=0)
        assert estimate.rate == pytest.approx(0.01, rel=1e-6) and estimate.low < 0.01 < estimate.high
        widths.append(estimate.high - estimate.low)
    assert widths[1] < widths[0] / 2
    assert expected_false_alarms(scores, 1e9).rate < 1e-6 and expected_false_alarms(scores, 1e-9).rate > 0.999


def test_folds_are_seeded_and_balanced():
    fold = fold_of_images(23, 10, seed=0)
    assert np.array_equal(fold, fold_of_images(23, 10, seed=0)) and not np.array_equal(fold, fold_of_images(23, 10, 1))
    assert sorted(np.bincount(fold).tolist()) == [2] * 7 + [3] * 3


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    """12 good fabric images and one with a large defect among them (a not-quite-good 'good' part)."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(4)
    for i in range(12):
        Image.fromarray(fabric_texture(rng, 64)).save(folder / f"good_{i:02d}.png")
    image, _ = paste_defect(fabric_texture(rng, 64), rng, "hole")
    Image.fromarray(image).save(folder / "bad_part.png")
    return folder


def _config(**changes):
    values = dict(backbone="efficientnet_lite0", resize=64, crop=None, coreset_ratio=0.2, batch_size=4)
    return PatchCoreConfig(**{**values, **changes})


def test_fit_lists_training_images_that_score_like_defects(training_set, tmp_path, capsys):
    paths = sorted(training_set.glob("*.png"))
    model = PatchCore(_config(), device="cpu").fit(paths)
    suspects = model.fit_report_.suspects
    assert suspects and suspects[0][0].endswith("bad_part.png")
    assert model.n_train_images_ == len(paths) and len(model.calibration_scores_) == len(paths)
    assert "expected false alarms" in model.fit_report_.thresholds
    assert main(["fit", str(training_set), "-o", str(tmp_path / "m.model"), "--backbone", "efficientnet_lite0",
                 "--resize", "64", "--crop", "none", "--coreset-ratio", "0.2", "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "score like defects" in err and "bad_part.png" in err and "expected false alarms" in err


def test_the_target_rate_sets_the_threshold(training_set):
    paths = sorted(training_set.glob("*.png"))
    strict = PatchCore(_config(false_alarm_rate=0.001), device="cpu").fit(paths)
    loose = PatchCore(_config(false_alarm_rate=0.2), device="cpu").fit(paths)
    assert strict.calibration_scores_ == loose.calibration_scores_  # the same evidence, another quantile
    assert strict.image_threshold_ > loose.image_threshold_ and strict.pixel_threshold_ > loose.pixel_threshold_
    assert strict.image_threshold_ == pytest.approx(quantile_threshold(strict.calibration_scores_, 0.001))


def _stain(image: np.ndarray, y: int, x: int) -> np.ndarray:
    """A 14 x 14 blue square: one kind of defect, the same on every part it is on."""
    image = image.copy()
    image[y:y + 14, x:x + 14] = (40, 90, 200)
    return image


def test_excluding_outliers_keeps_a_bad_training_part_out_of_the_bank(tmp_path):
    """A stained part among 12 good ones: the plain bank learns the stain as normal and a new stained part
    scores low; with exclude_outliers the stain's patches stay out and it scores near a clean bank's score."""
    rng = np.random.default_rng(4)
    for i in range(12):
        Image.fromarray(fabric_texture(rng, 64)).save(tmp_path / f"good_{i:02d}.png")
    Image.fromarray(_stain(fabric_texture(rng, 64), 20, 30)).save(tmp_path / "bad_part.png")
    paths = sorted(tmp_path.glob("*.png"))
    new_stain, new_good = _stain(fabric_texture(rng, 64), 36, 10), fabric_texture(rng, 64)
    plain = PatchCore(_config(), device="cpu").fit(paths)
    cleaned = PatchCore(_config(exclude_outliers=True), device="cpu").fit(paths)
    clean_set = PatchCore(_config(), device="cpu").fit([p for p in paths if p.name != "bad_part.png"])
    assert plain.fit_report_.excluded_patches == 0 and 0 < cleaned.fit_report_.excluded_patches < 64
    stain_plain, good_plain = plain.predict([new_stain, new_good]).scores.tolist()
    stain_cleaned, good_cleaned = cleaned.predict([new_stain, new_good]).scores.tolist()
    stain_clean_set = float(clean_set.predict(new_stain).scores[0])
    # At least half the way back (the cut comes from 13 image scores: 8-11 of the stain's patches fall above it,
    # by how the fold banks are made; the rest are its edges, mostly fabric).
    assert stain_cleaned > stain_plain + 0.5 * (stain_clean_set - stain_plain)
    assert good_cleaned == pytest.approx(good_plain, rel=0.05)
    assert cleaned.fit_report_.suspects[0][0].endswith("bad_part.png")  # still named for a look
