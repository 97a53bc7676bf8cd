"""The working geometry fit chooses, and images of every size and shape at one scale.

The MVTec protocol for square parts of one size; otherwise one scale factor for every image (aspect kept,
each image its own feature grid, one bank). Checked against io/sizing.py's arithmetic (hand-computed cases
first) and against scoring each image on its own.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore import InputError, PatchCore, PatchCoreConfig
from patchcore.app.cli import main
from patchcore.estimator.geometry import choose_scale
from patchcore.io.sizing import feature_grid, resized_size, scaled_side

# Elongated, wide, square, rotated (the same part turned 90 degrees), small and tiny (1 x 2) images.
VARIED = [(250, 100), (100, 250), (120, 120), (181, 97), (40, 24), (1, 2)]


def _save(folder, count, height, width, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _save_sizes(folder, sizes, seed=0):
    return [_save(folder / f"{h}x{w}", 1, h, w, seed=seed + i)[0] for i, (h, w) in enumerate(sizes)]


def _config(**extra):
    settings = {"backbone": "resnet18_random", "coreset_ratio": 0.2, "calibration_ratio": 0.0,
                "pixel_budget": 96 * 96}
    return PatchCoreConfig(**{**settings, **extra})


def test_the_scale_rule_by_hand():
    # 1250 x 500 at budget 320^2: s = sqrt(102400 / 625000) = 0.40477 -> 0.4048 (4 significant digits)
    assert choose_scale([(1250, 500)], 320 * 320) == 0.4048
    # 1250 * 0.4048 = 506.0 -> 31.6 strides of 16 -> 32 -> 512; 500 * 0.4048 = 202.4 -> 12.65 -> 13 -> 208
    assert resized_size(1250, 500, None, scale=0.4048, align=16) == (512, 208)
    assert scaled_side(8, 1.0, 16) == 16 and scaled_side(24, 1.0, 16) == 32  # at least one stride; half up
    # the median image by area decides, whatever the others are
    assert choose_scale([(100, 100), (10, 10), (400, 400)], 100 * 100) == 1.0
    assert feature_grid((512, 208), 8) == (64, 26) and feature_grid((17, 9), 8) == (3, 2)


def test_square_parts_keep_the_mvtec_protocol(tmp_path):
    model = PatchCore(_config(), device="cpu").fit(_save(tmp_path / "sq", 3, 300, 300))
    assert (model.config.resize, model.config.crop, model.config.scale) == (256, 224, None)
    assert model.input_size_ == (224, 224) and "MVTec protocol" in model.fit_report_.geometry


def test_elongated_parts_are_seen_whole_at_one_scale(tmp_path):
    paths = _save(tmp_path / "tall", 3, 250, 100)
    model = PatchCore(_config(), device="cpu").fit(paths)
    scale = choose_scale([(250, 100)], 96 * 96)
    assert (model.config.resize, model.config.crop, model.config.scale) == (None, None, scale)
    assert model.input_size_ == resized_size(250, 100, None, scale=scale, align=16)
    assert "one scale" in model.fit_report_.geometry
    assert model.maps_at_original_size(model.predict(paths[0]).maps, (250, 100)).isnan().sum() == 0


def test_varied_sizes_and_shapes_share_one_bank(tmp_path):
    """Every image enters the bank with its own grid; each map comes back at its own size; scoring a mixed
    list equals scoring each image alone (grouping by size changes no number)."""
    paths = _save_sizes(tmp_path / "train", VARIED * 2)
    model = PatchCore(_config(coreset_ratio=0.5), device="cpu").fit(paths)
    scale, stride = model.config.scale, model.config.feature_strides[0]
    assert scale == choose_scale(VARIED * 2, 96 * 96) and model.fit_report_.skipped == []
    assert model.n_train_images_ == len(paths)
    inputs = [resized_size(h, w, None, scale=scale, align=16) for h, w in VARIED * 2]
    assert model.n_train_patches_ == sum(np.prod(feature_grid(s, stride)) for s in inputs)

    tests = _save_sizes(tmp_path / "test", VARIED, seed=50)
    mixed = model.predict(tests)
    assert isinstance(mixed.maps, list)
    assert [tuple(m.shape) for m in mixed.maps] == [resized_size(h, w, None, scale=scale, align=16) for h, w in VARIED]
    alone = torch.cat([model.predict(p).scores for p in tests])
    assert torch.allclose(mixed.scores, alone, rtol=1e-5)
    for i, path in enumerate(tests):
        assert torch.allclose(mixed.maps[i], model.predict(path).maps[0], rtol=1e-4, atol=1e-5)


def test_images_of_one_model_size_but_different_own_sizes_go_in_one_pass(tmp_path):
    """Two sizes that land on the same model input: one group, already resized, the same numbers."""
    model = PatchCore(_config(), device="cpu").fit(_save(tmp_path / "tall", 3, 250, 100))
    lands = resized_size(250, 100, None, scale=model.config.scale, align=16)
    other = next((h, w) for h in range(240, 260) for w in range(95, 105)
                 if (h, w) != (250, 100) and resized_size(h, w, None, scale=model.config.scale, align=16) == lands)
    images = [np.array(Image.open(p)) for p in _save_sizes(tmp_path / "t", [(250, 100), other], seed=7)]
    groups = model._groups([torch.from_numpy(i).permute(2, 0, 1).contiguous() for i in images])
    assert len(groups) == 1 and groups[0].at_input and groups[0].positions == [0, 1]
    together = model.predict(images)
    assert isinstance(together.maps, torch.Tensor) and together.maps.shape[0] == 2
    alone = torch.cat([model.predict(i).scores for i in images])
    assert torch.allclose(together.scores, alone, rtol=1e-5)


def test_an_image_of_another_shape_is_scored_at_the_models_scale(tmp_path):
    model = PatchCore(_config(), device="cpu").fit(_save(tmp_path / "tall", 3, 250, 100))
    wide = _save(tmp_path / "wide", 1, 100, 250, seed=1)[0]
    result = model.predict(wide)  # the same part turned: not refused, not distorted
    assert tuple(result.maps.shape[1:]) == resized_size(100, 250, None, scale=model.config.scale, align=16)


def test_explicit_sizes_and_the_protocol_by_name_are_kept(tmp_path):
    paths = _save(tmp_path / "tall", 3, 250, 100)
    given = PatchCore(_config(resize=(64, 32), crop=None), device="cpu").fit(paths)
    assert given.input_size_ == (64, 32) and "as given" in given.fit_report_.geometry
    mvtec = PatchCore(_config(geometry="mvtec"), device="cpu").fit(paths)
    assert mvtec.input_size_ == (224, 224) and "geometry mvtec" in mvtec.fit_report_.geometry
    scaled = PatchCore(_config(scale=0.5), device="cpu").fit(paths)
    assert scaled.input_size_ == (128, 48) and "as given" in scaled.fit_report_.geometry


def test_shorter_side_rule_gives_each_image_its_own_grid(tmp_path):
    """--resize 256 --crop none on varied images (the per-image rule) was refused: now one bank."""
    paths = _save_sizes(tmp_path / "train", [(80, 40), (40, 80), (60, 60)])
    model = PatchCore(_config(resize=48, crop=None), device="cpu").fit(paths)
    assert model.n_train_patches_ == sum(np.prod(feature_grid(resized_size(h, w, 48), 8))
                                         for h, w in [(80, 40), (40, 80), (60, 60)])


def test_an_exact_size_model_refuses_another_aspect_per_file(tmp_path):
    model = PatchCore(_config(resize=(64, 32), crop=None), device="cpu").fit(_save(tmp_path / "tall", 3, 250, 100))
    wide = _save(tmp_path / "wide", 1, 100, 250, seed=1)
    good = _save(tmp_path / "tall2", 2, 240, 100, seed=2)
    batches = list(model.iter_predict([good[0], wide[0], good[1]]))
    assert sum(len(b.paths) for b in batches) == 2
    failures = [f for b in batches for f in b.failures]
    assert len(failures) == 1 and "000.png" in failures[0].path and "aspect ratio" in failures[0].reason
    with pytest.raises(InputError, match="aspect ratio"):
        model.predict(wide[0])
    tensor = torch.from_numpy(np.array(Image.open(wide[0]))).permute(2, 0, 1)[None].contiguous()
    with pytest.raises(InputError, match="aspect ratio"):  # the serving path checks as files are checked
        model.predict_batch(tensor)


def test_fit_prints_the_geometry_it_chose(tmp_path, capsys):
    _save(tmp_path / "tall", 3, 250, 100)
    code = main(["fit", str(tmp_path / "tall"), "-o", str(tmp_path / "m.model"), "--backbone", "resnet18_random",
                 "--pixel-budget", str(96 * 96), "--quiet", "--device", "cpu", "--coreset-ratio", "0.2"])
    scale = choose_scale([(250, 100)], 96 * 96)
    assert code == 0 and f"working geometry: whole part at one scale: x{scale:g} for every image" in \
        capsys.readouterr().err
