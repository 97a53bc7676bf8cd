"""The working geometry fit chooses: the MVTec protocol for square parts, the whole part otherwise."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore import InputError, PatchCore, PatchCoreConfig
from patchcore.app.cli import main
from patchcore.estimator.geometry import whole_part_size


def _save(folder, count, height, width, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _config(**extra):
    return PatchCoreConfig(backbone="resnet18_random", coreset_ratio=0.2, calibration_ratio=0.0,
                           pixel_budget=96 * 96, **extra)


def test_the_whole_part_fits_the_budget_at_its_aspect():
    assert whole_part_size([(1250, 500)], 320 * 320) == (496, 192)  # H x W, multiples of 16, <= budget
    assert whole_part_size([(100, 100), (300, 100), (200, 100)], 200 * 100) == (192, 96)  # the median aspect 2


def test_square_parts_keep_the_mvtec_protocol(tmp_path):
    model = PatchCore(_config(), device="cpu").fit(_save(tmp_path / "sq", 3, 300, 300))
    assert (model.config.resize, model.config.crop) == (256, 224) and model.input_size_ == (224, 224)
    assert "MVTec protocol" in model.fit_report_.geometry


def test_elongated_parts_are_seen_whole(tmp_path):
    paths = _save(tmp_path / "tall", 3, 250, 100)
    model = PatchCore(_config(), device="cpu").fit(paths)
    assert model.config.crop is None and model.config.resize == whole_part_size([(250, 100)], 96 * 96)
    assert model.input_size_ == model.config.resize and "whole part" in model.fit_report_.geometry
    assert model.maps_at_original_size(model.predict(paths[0]).maps, (250, 100)).isnan().sum() == 0


def test_explicit_sizes_and_the_protocol_by_name_are_kept(tmp_path):
    paths = _save(tmp_path / "tall", 3, 250, 100)
    given = PatchCore(_config(resize=(64, 32), crop=None), device="cpu").fit(paths)
    assert given.input_size_ == (64, 32) and "as given" in given.fit_report_.geometry
    mvtec = PatchCore(_config(geometry="mvtec"), device="cpu").fit(paths)
    assert mvtec.input_size_ == (224, 224) and "geometry mvtec" in mvtec.fit_report_.geometry


def test_an_image_of_another_aspect_is_refused_per_file(tmp_path):
    model = PatchCore(_config(), device="cpu").fit(_save(tmp_path / "tall", 3, 250, 100))
    wide = _save(tmp_path / "wide", 1, 100, 250, seed=1)
    good = _save(tmp_path / "tall2", 2, 240, 100, seed=2)
    batches = list(model.iter_predict([good[0], wide[0], good[1]]))
    assert sum(len(b.paths) for b in batches) == 2
    failures = [f for b in batches for f in b.failures]
    assert len(failures) == 1 and "000.png" in failures[0].path and "aspect ratio" in failures[0].reason
    with pytest.raises(InputError, match="aspect ratio"):
        model.predict(wide[0])


def test_fit_prints_the_geometry_it_chose(tmp_path, capsys):
    _save(tmp_path / "tall", 3, 250, 100)
    code = main(["fit", str(tmp_path / "tall"), "-o", str(tmp_path / "m.model"), "--backbone", "resnet18_random",
                 "--pixel-budget", str(96 * 96), "--quiet", "--device", "cpu", "--coreset-ratio", "0.2"])
    assert code == 0 and "working geometry: whole part: resize 144x64" in capsys.readouterr().err
