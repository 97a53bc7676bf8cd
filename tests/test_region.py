"""The inspection region: what lies outside it never enters the bank and never raises a score."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore import InputError, PatchCore, PatchCoreConfig
from patchcore.evaluation.synthetic import fabric_texture, paste_defect

SIZE = 128


def _part(rng, *, background: str) -> np.ndarray:
    """A textured part in the left half; the right half is a fixture: plain grey, or a changing clutter."""
    image = fabric_texture(rng, SIZE)
    if background == "plain":
        image[:, SIZE // 2:] = 128
    else:  # another fixture colour and a label stuck on it, different for every part
        image[:, SIZE // 2:] = rng.integers(0, 256, 3, dtype=np.uint8)
        y, x = rng.integers(0, SIZE - 24), rng.integers(SIZE // 2, SIZE - 24)
        image[y:y + 24, x:x + 24] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def region_file(tmp_path_factory):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, : SIZE // 2 - 24] = 255  # the part, with a margin away from the fixture
    path = tmp_path_factory.mktemp("region") / "region.png"
    Image.fromarray(mask).save(path)
    return path


def _config(**extra) -> PatchCoreConfig:
    values = dict(backbone="resnet18_random", resize=None, crop=None, coreset_ratio=0.5, calibration_ratio=0.0,
                  feature_strides=(4, 8))  # a receptive field small enough for the 24-pixel margin
    return PatchCoreConfig(**{**values, **extra})


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = [_part(rng, background="plain") for _ in range(16)]
    cluttered = [_part(rng, background="clutter") for _ in range(4)]
    held_out = [_part(rng, background="plain") for _ in range(4)]
    defects = []
    for kind in ("stain", "hole"):
        for _ in range(3):
            image = _part(rng, background="plain")
            left = image[:, : SIZE // 2 - 24].copy()
            defects.append(np.concatenate([paste_defect(left, rng, kind)[0], image[:, SIZE // 2 - 24:]], axis=1))
    return train, cluttered, held_out, defects


def test_a_changing_background_outside_the_region_stops_raising_scores(data, region_file):
    train, cluttered, held_out, defects = data
    plain = PatchCore(_config(), device="cpu").fit(train)
    masked = PatchCore(_config(region=str(region_file)), device="cpu").fit(train)
    # Without the region every cluttered good part is a false alarm far above the good parts ...
    assert plain.predict(cluttered).scores.min() > 3 * plain.predict(held_out).scores.max()
    # ... with it, they score like the good parts, and the strongest defects inside the region still stand out.
    good_max = masked.predict(held_out).scores.max()
    assert masked.predict(cluttered).scores.max() <= good_max
    assert masked.predict(defects).scores.max() > 2 * good_max


def test_outside_patches_never_enter_the_bank_and_outside_pixels_score_zero(data, region_file):
    train, cluttered, _, _ = data
    full = PatchCore(_config(coreset_ratio=1.0), device="cpu").fit(train)
    masked = PatchCore(_config(coreset_ratio=1.0, region=str(region_file)), device="cpu").fit(train)
    inside = masked._region_patches(masked.state_.region, masked.grid_)
    assert masked.memory_bank_.shape[0] == len(train) * int(inside.sum()) < full.memory_bank_.shape[0]
    assert masked.n_train_patches_ == masked.memory_bank_.shape[0]
    maps = masked.predict(cluttered).maps
    outside = ~masked.state_.region
    assert torch.all(maps[:, outside] == 0) and torch.all(maps[:, ~outside].amax(1) > 0)


def test_a_region_of_another_size_or_empty_is_refused(data, tmp_path):
    train = data[0]
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="small.png: the inspection region becomes"):
        PatchCore(_config(region=str(tmp_path / "small.png")), device="cpu").fit(train)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="covers no patch"):
        PatchCore(_config(region=str(tmp_path / "empty.png")), device="cpu").fit(train)


def test_the_region_travels_in_the_model_file(data, region_file, tmp_path):
    train, cluttered, _, _ = data
    model = PatchCore(_config(coreset_ratio=0.1, region=str(region_file)), device="cpu").fit(train[:4])
    model.save(tmp_path / "m.model")
    region_file.rename(tmp_path / "moved.png")  # the file is not needed to score: the mask is in the model
    try:
        loaded = PatchCore.load(tmp_path / "m.model", device="cpu")
        assert torch.equal(loaded.state_.region, model.state_.region)
        torch.testing.assert_close(loaded.predict(cluttered).scores, model.predict(cluttered).scores)
    finally:
        (tmp_path / "moved.png").rename(region_file)


def test_an_update_keeps_the_region(data, region_file):
    train, cluttered, _, _ = data
    model = PatchCore(_config(coreset_ratio=0.1, region=str(region_file)), device="cpu").fit(train[:4])
    before = model.memory_bank_.shape[0]
    model.update(cluttered, max_new=50)
    inside = model._region_patches(model.state_.region, model.grid_)
    assert model.state_.region is not None and before < model.memory_bank_.shape[0] <= before + 50
    assert model.n_train_patches_ == 8 * int(inside.sum())  # 4 fitted + 4 added images, inside patches only
