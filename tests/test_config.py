"""PatchCoreConfig: validation, JSON round trip, unknown fields."""
from __future__ import annotations

import dataclasses
import json

import pytest

from patchcore.config import PatchCoreConfig


def test_defaults_are_the_paper_setting():
    cfg = PatchCoreConfig()
    assert cfg.backbone == "wide_resnet50_2"
    assert cfg.feature_strides == (8, 16)  # layer2 + layer3
    assert (cfg.resize, cfg.crop) == (256, 224)
    assert cfg.patch_size == 3
    assert cfg.embedding_dim == 1024
    assert cfg.coreset_ratio == 0.1 and cfg.coreset_size is None
    assert cfg.projection_dim == 128
    assert cfg.reweight_neighbours == 9
    assert cfg.blur_sigma == 4.0


def test_every_field_has_help_for_the_cli():
    for f in dataclasses.fields(PatchCoreConfig):
        assert f.metadata.get("help"), f.name


def test_frozen():
    cfg = PatchCoreConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("changes, match", [
    ({"feature_strides": ()}, "feature_strides"),
    ({"feature_strides": (8, 0)}, "feature_strides"),
    ({"feature_strides": (-8,)}, "feature_strides"),
    ({"patch_size": 0}, "patch_size"),
    ({"patch_size": 4}, "patch_size"),
    ({"patch_size": -3}, "patch_size"),
    ({"coreset_ratio": 0.0}, "coreset_ratio"),
    ({"coreset_ratio": 1.5}, "coreset_ratio"),
    ({"coreset_ratio": -0.1}, "coreset_ratio"),
    ({"coreset_size": 0}, "coreset_size"),
    ({"calibration_ratio": 1.0}, "calibration_ratio"),
    ({"calibration_ratio": -0.2}, "calibration_ratio"),
    ({"reweight_neighbours": -1}, "reweight_neighbours"),
    ({"embedding_dim": 1}, "embedding_dim"),
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"embedding_dim": 2, "feature_strides": (4, 8, 16)}, "embedding_dim"),
])
def test_bad_values_raise_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        PatchCoreConfig(**changes)


@pytest.mark.parametrize("changes", [
    {"coreset_ratio": 1.0}, {"coreset_size": 1}, {"calibration_ratio": 0.0}, {"reweight_neighbours": 0},
    {"patch_size": 1}, {"embedding_dim": 2}, {"feature_strides": (4,)}, {"crop": None}, {"resize": (300, 200)},
])
def test_boundary_values_are_accepted(changes):
    cfg = PatchCoreConfig(**changes)
    for key, value in changes.items():
        assert getattr(cfg, key) == value


@pytest.mark.parametrize("changes", [{"projection_dim": 0}, {"batch_size": 0}, {"resize": 0}, {"crop": 0},
                                     {"crop": (224, -1)}])
def test_unvalidated_bad_values_raise(changes):
    with pytest.raises(ValueError):
        PatchCoreConfig(**changes)


@pytest.mark.parametrize("cfg", [
    PatchCoreConfig(),
    PatchCoreConfig(backbone="resnet18", weights="/models/r18.pth", feature_strides=(4, 8, 16), resize=(300, 200),
                    crop=(256, 192), patch_size=5, embedding_dim=300, coreset_ratio=0.25, coreset_size=1234,
                    projection_dim=64, seed=7, reweight_neighbours=0, blur_sigma=2.5, calibration_ratio=0.0,
                    batch_size=3),
    PatchCoreConfig(resize=320, crop=None),
])
def test_json_round_trip(cfg):
    as_json = json.dumps(cfg.to_dict())
    values = json.loads(as_json)
    assert isinstance(values["feature_strides"], list)  # JSON turned the tuples into lists ...
    back = PatchCoreConfig.from_dict(values)
    assert back == cfg  # ... and the config turns them back
    assert isinstance(back.feature_strides, tuple)
    assert not isinstance(back.resize, list) and not isinstance(back.crop, list)
    assert hash(back) == hash(cfg)
    assert PatchCoreConfig(**cfg.to_dict()) == cfg


def test_from_dict_partial_uses_defaults():
    cfg = PatchCoreConfig.from_dict({"backbone": "resnet18", "feature_strides": [8]})
    assert cfg == PatchCoreConfig(backbone="resnet18", feature_strides=(8,))


def test_unknown_fields_raise():
    with pytest.raises(ValueError, match=r"unknown PatchCoreConfig fields: \['banana', 'coreset_percent'\]"):
        PatchCoreConfig.from_dict({"coreset_percent": 10, "banana": 1, "seed": 1})


def test_from_dict_validates():
    with pytest.raises(ValueError, match="patch_size"):
        PatchCoreConfig.from_dict({"patch_size": 2})


@pytest.mark.parametrize("changes, match", [
    ({"resize": 16385}, "resize"),
    ({"resize": (256, 20_000)}, "resize"),
    ({"crop": 100_000}, "crop"),
    ({"resize": "256"}, "resize"),
    ({"resize": 256.0}, "resize"),
    ({"resize": (256, 256, 256)}, "resize"),
    ({"crop": True}, "crop"),
    ({"blur_sigma": 64.5}, "blur_sigma"),
    ({"blur_sigma": -1.0}, "blur_sigma"),
    ({"blur_sigma": float("nan")}, "blur_sigma"),
    ({"blur_sigma": float("inf")}, "blur_sigma"),
    ({"blur_sigma": "4"}, "blur_sigma"),
    ({"coreset_ratio": float("nan")}, "coreset_ratio"),
    ({"calibration_ratio": float("nan")}, "calibration_ratio"),
    ({"embedding_dim": 16385}, "embedding_dim"),
    ({"embedding_dim": 512.0}, "embedding_dim"),
    ({"projection_dim": 1 << 20}, "projection_dim"),
    ({"coreset_size": -5}, "coreset_size"),
    ({"coreset_size": 1 << 40}, "coreset_size"),
    ({"coreset_size": 10.5}, "coreset_size"),
    ({"patch_size": True}, "patch_size"),
    ({"patch_size": 65}, "patch_size"),
    ({"batch_size": 10**9}, "batch_size"),
    ({"reweight_neighbours": 10**6}, "reweight_neighbours"),
    ({"feature_strides": (8, 4096)}, "feature_strides"),
    ({"feature_strides": (8.0, 16.0)}, "feature_strides"),
    ({"feature_strides": "8,16"}, "feature_strides"),
    ({"feature_strides": tuple(range(1, 11))}, "feature_strides"),
    ({"seed": 1 << 70}, "seed"),
    ({"seed": "0"}, "seed"),
    ({"backbone": ""}, "backbone"),
    ({"backbone": 18}, "backbone"),
    ({"weights": 3}, "weights"),
])
def test_bounds_and_types_raise_a_config_error_naming_the_field(changes, match):
    from patchcore.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        PatchCoreConfig(**changes)
    with pytest.raises(ConfigError, match=match):  # the same from a model file's JSON
        PatchCoreConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})


@pytest.mark.parametrize("changes", [
    {"resize": 16384}, {"crop": (16384, 1)}, {"blur_sigma": 64.0}, {"blur_sigma": 0.0}, {"blur_sigma": 4},
    {"embedding_dim": 16384}, {"coreset_ratio": 1}, {"seed": (1 << 64) - 1}, {"seed": -1}, {"patch_size": 63},
])
def test_bound_values_are_accepted_and_kept_as_given(changes):
    import numpy as np

    cfg = PatchCoreConfig(**changes)
    for key, value in changes.items():
        assert getattr(cfg, key) == value and type(getattr(cfg, key)) is type(value)  # never normalised:
    # a config's JSON (so a model file's bytes) is what the caller gave
    assert PatchCoreConfig(batch_size=np.int64(4)).batch_size == 4  # numpy integers are integers
