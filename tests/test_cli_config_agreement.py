"""The command line and the config agree on every option, and the threshold options mean what --help says."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCore, PatchCoreConfig
from patchcore.app.cli import EXIT_ERROR, build_parser, main
from patchcore.app.options import config_from_args

# A non-default value for every field, written as a user would type it, and what the config must hold.
TYPED = {
    "backbone": ("resnet18", "resnet18"),
    "weights": ("w.pth", "w.pth"),
    "feature_strides": ("4,16", (4, 16)),
    "resize": ("none", None),
    "crop": ("100,50", (100, 50)),
    "patch_size": ("5", 5),
    "embedding_dim": ("512", 512),
    "coreset_ratio": ("0.25", 0.25),
    "coreset_size": ("77", 77),
    "projection_dim": ("64", 64),
    "seed": ("3", 3),
    "reweight_neighbours": ("0", 0),
    "blur_sigma": ("2.5", 2.5),
    "calibration_ratio": ("0.3", 0.3),
    "batch_size": ("2", 2),
    "tile_size": ("512", 512),
    "tile_overlap": ("96", 96),
    "geometry": ("mvtec", "mvtec"),
    "pixel_budget": ("40000", 40000),
    "region": ("roi.png", "roi.png"),
    "scale": ("0.5", 0.5),
    "false_alarm_rate": ("0.05", 0.05),
    "exclude_outliers": ("true", True),
}


def test_every_field_has_a_typed_case():
    assert set(TYPED) == {f.name for f in dataclasses.fields(PatchCoreConfig)}


@pytest.mark.parametrize("name", sorted(TYPED))
def test_each_option_reaches_its_config_field(name):
    text, value = TYPED[name]
    args = build_parser().parse_args(["fit", "t", "-o", "m", "--" + name.replace("_", "-"), text])
    config = config_from_args(args)
    assert getattr(config, name) == value
    if name == "scale":  # scale replaces the default resize and crop (config.py): they come back with it unset
        config = dataclasses.replace(config, resize=256, crop=224, scale=None)
    assert dataclasses.replace(config, **{name: getattr(PatchCoreConfig(), name)}) == PatchCoreConfig()


def test_resize_none_keeps_each_image_size(tmp_path):
    """`--resize none --crop none`: the model sees the image at its own size (no dead branch)."""
    config = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None, coreset_ratio=0.5,
                             calibration_ratio=0.0)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(3)]
    model = PatchCore(config, device="cpu").fit(images)
    assert model.input_size_ == (48, 80) and model.grid_ == (6, 10)
    assert model.predict(images[0]).maps.shape == (1, 48, 80)


def test_a_value_the_config_refuses_is_a_one_line_error(tmp_path, capsys):
    code = main(["fit", str(tmp_path), "-o", str(tmp_path / "m.model"), "--patch-size", "4"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "patch_size must be odd" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def model_file(category, tmp_path_factory):
    path = tmp_path_factory.mktemp("thresholds") / "m.model"
    assert main(["fit", str(category / "train" / "good"), "-o", str(path), "--backbone", "resnet18_random",
                 "--resize", "64", "--crop", "none", "--quiet", "--device", "cpu"]) == 0
    return path


def _predict(model_file, category, out, *options):
    assert main(["predict", str(model_file), str(category / "test"), "-o", str(out), "--quiet", *options]) in (0, 1)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    summary = json.loads((out / "scores.json").read_text())
    masks = {r["name"]: np.asarray(Image.open(out / "masks" / f"{r['name']}.png")) > 0 for r in rows}
    return rows, summary, masks


def test_threshold_replaces_the_image_threshold_only(model_file, category, tmp_path):
    model = PatchCore.load(model_file, device="cpu")
    rows, summary, masks = _predict(model_file, category, tmp_path / "default")
    scores = sorted(float(r["score"]) for r in rows)
    middle = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    rows2, summary2, masks2 = _predict(model_file, category, tmp_path / "t", "--threshold", str(middle))
    assert summary2["image_threshold"] == middle
    assert summary2["pixel_threshold"] == summary["pixel_threshold"] == model.pixel_threshold_
    assert sum(r["label"] == "defect" for r in rows2) == len(rows2) // 2
    for row in rows2:
        assert row["label"] == ("defect" if float(row["score"]) > middle else "good")
    assert all(np.array_equal(masks[name], masks2[name]) for name in masks)  # masks untouched


def test_pixel_threshold_replaces_the_pixel_threshold_only(model_file, category, tmp_path):
    rows, summary, masks = _predict(model_file, category, tmp_path / "default")
    rows2, summary2, masks2 = _predict(model_file, category, tmp_path / "p", "--pixel-threshold", "0")
    assert summary2["image_threshold"] == summary["image_threshold"]
    assert [r["label"] for r in rows2] == [r["label"] for r in rows]
    assert all(m.all() for m in masks2.values())  # every pixel score is above 0
    assert not all(m.all() for m in masks.values())
