"""Ensembles (paper, section 4.4.1): the combination against a hand-computed oracle, normalisation from training
data only, out-of-sample nominal maps, one model file, members that do not fit together refused, the wiring of
the applications (CLI fit/predict, load_model for either kind). Random-init backbones, tiny images."""
from __future__ import annotations

import dataclasses
import json
from statistics import NormalDist

import numpy as np
import pytest
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.errors import ConfigError, ModelFileError
from patchcore.estimator.ensemble import (
    Normaliser,
    PatchCoreEnsemble,
    build_model,
    load_model,
    robust_location_scale,
)
from patchcore.evaluation.synthetic import make_category
from patchcore.io.model_file import read_model_file, write_model_file

BACKBONES = "resnet18_random,efficientnet_lite0_random"
CONFIG = PatchCoreConfig(backbone=BACKBONES, resize=64, crop=None, coreset_ratio=0.1, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("ens"), n_train=20, n_test_good=3, n_test_per_defect=2, size=64,
                         seed=3)


@pytest.fixture(scope="module")
def train(data):
    return sorted((data / "train" / "good").glob("*.png"))


@pytest.fixture(scope="module")
def test_images(data):
    return sorted((data / "test").glob("*/*.png"))


@pytest.fixture(scope="module")
def ensemble(train):
    return PatchCoreEnsemble(CONFIG, device="cpu").fit(train)


def _hand_normaliser(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    median = np.median(v)
    return float(median), float(1.4826 * np.median(np.abs(v - median)))


def test_robust_location_scale_by_hand():
    # median 3, |x - 3| = 2 1 0 1 97 -> MAD 1: the outlier (a "good" part that is not) moves neither
    assert robust_location_scale([1, 2, 3, 4, 100]) == pytest.approx((3.0, 1.4826))
    assert robust_location_scale([5, 5, 5, 5, 9])[1] > 0  # MAD 0: falls back to the standard deviation
    assert robust_location_scale([2, 2])[1] == 2.0  # all equal: |median|, never 0
    assert Normaliser(3.0, 2.0)(torch.tensor([5.0, 1.0])).tolist() == [1.0, -1.0]


def test_combination_against_hand_oracle(ensemble, test_images):
    """Scores: mean over members of (s_k - median_k) / (1.4826 MAD_k) of each member's calibration_scores_,
    computed here by hand; maps with the stored pixel normalisers; labels at the (1 - rate) quantile of the
    normal through the combined nominal scores' median and 95th percentile."""
    state = ensemble.ensemble_state_
    members = ensemble.members
    hand = [_hand_normaliser(m.calibration_scores_) for m in members]
    assert [v for n in state.image for v in (n.location, n.scale)] == pytest.approx([v for h in hand for v in h])
    singles = [m.predict(test_images) for m in members]
    expected = sum((r.scores.double() - loc) / scale for r, (loc, scale) in zip(singles, hand)) / len(members)
    result = ensemble.predict(test_images)
    torch.testing.assert_close(result.scores.double(), expected, rtol=1e-5, atol=1e-5)
    expected_maps = sum((r.maps - n.location) / n.scale for r, n in zip(singles, state.pixel)) / len(members)
    torch.testing.assert_close(result.maps, expected_maps, rtol=1e-5, atol=1e-5)
    # each member counts: the ensemble is neither member alone
    for r, (loc, scale) in zip(singles, hand):
        assert not torch.allclose(result.scores.double(), (r.scores.double() - loc) / scale, atol=1e-3)
    combined = sum((np.asarray(m.calibration_scores_) - loc) / scale for m, (loc, scale) in zip(members, hand)) / 2
    median, q95 = np.quantile(combined, [0.5, 0.95])  # the normal through the median and the 95th percentile
    threshold = median + NormalDist().inv_cdf(1 - CONFIG.false_alarm_rate) * (q95 - median) / NormalDist().inv_cdf(0.95)
    assert ensemble.image_threshold_ == pytest.approx(threshold)
    assert torch.equal(result.labels, result.scores > ensemble.image_threshold_)
    assert torch.equal(result.masks, result.maps > ensemble.pixel_threshold_)


def test_normalisation_from_training_data_only(ensemble, train, test_images):
    """The authors' code min-max normalised over the test set: an image's score then depends on the other test
    images. Here nothing learned changes at predict, and an image scores the same alone or beside outliers."""
    before = ensemble.ensemble_state_
    alone = [ensemble.predict([path]) for path in test_images]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]  # far outside anything seen
    crowd = ensemble.predict([test_images[0], *noise, *test_images[1:]])
    assert ensemble.ensemble_state_ == before
    kept = [0, *range(4, 3 + len(test_images))]  # the test images' places among the noise
    torch.testing.assert_close(crowd.scores[kept], torch.cat([a.scores for a in alone]))
    torch.testing.assert_close(crowd.maps[kept], torch.cat([a.maps for a in alone]))
    assert float(crowd.scores[1:4].min()) > float(crowd.scores[0])  # the noise is scored, not normalised away
    # the statistics are those of the training images: refitting the normalisation on them gives the same state
    again = PatchCoreEnsemble.from_members(ensemble.members).calibrate(train)
    assert again.ensemble_state_ == before


def test_nominal_maps_are_out_of_sample(ensemble, train):
    """Every bank row is some training image's own row, left out exactly when that image is scored; so the
    nominal scores are higher than the in-sample ones (scored against a bank holding their own patches)."""
    assert ensemble.excluded_rows_ == [m.memory_bank_.shape[0] for m in ensemble.members]
    from patchcore.estimator.ensemble import nominal_pass

    nominal = nominal_pass(ensemble.members, train)
    for k, member in enumerate(ensemble.members):
        in_sample = member.predict(train).maps  # (64 x 64: below POOLED_SIDE, so not pooled)
        out = torch.stack(nominal.maps[k])
        assert bool((out >= in_sample - 1e-5).all())  # fewer bank rows: no patch distance can fall
        assert float((out.flatten(1).amax(1) > in_sample.flatten(1).amax(1) + 1e-4).float().mean()) > 0.5


def test_save_load_round_trip(ensemble, test_images, tmp_path):
    path = tmp_path / "e.model"
    ensemble.save(path)
    loaded = load_model(path, device="cpu")
    assert isinstance(loaded, PatchCoreEnsemble)
    assert loaded.ensemble_state_ == ensemble.ensemble_state_
    assert [m.config for m in loaded.members] == [m.config for m in ensemble.members]
    a, b = ensemble.predict(test_images), loaded.predict(test_images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps) and torch.equal(a.labels, b.labels)
    tensors, header = read_model_file(path, format_name="patchcore-ensemble")
    assert sorted(tensors) == ["member0.memory_bank", "member1.memory_bank"]
    assert [h["backbone"] for h in header["members"]] == BACKBONES.split(",")
    with pytest.raises(ModelFileError, match="ensemble"):  # a single-model path says what the file is
        PatchCore.load(path, device="cpu")


def test_single_model_files_load_unchanged(ensemble, tmp_path):
    path = tmp_path / "single.model"
    ensemble.members[0].save(path)
    before = path.read_bytes()
    loaded = load_model(path, device="cpu")
    assert type(loaded) is PatchCore
    loaded.save(tmp_path / "again.model")
    assert (tmp_path / "again.model").read_bytes() == before


def test_member_mismatch_refused(ensemble, train, tmp_path):
    other = PatchCore(dataclasses.replace(CONFIG, backbone="resnet18_random", resize=48), device="cpu").fit(train)
    with pytest.raises(ConfigError, match="resize"):
        PatchCoreEnsemble.from_members([ensemble.members[0], other]).calibrate(train)
    with pytest.raises(ConfigError, match="2 to"):
        PatchCoreEnsemble(dataclasses.replace(CONFIG, backbone="resnet18_random"), device="cpu")
    # a file whose member was edited to another geometry, or whose normaliser scale is 0, is refused at load
    path = tmp_path / "e.model"
    ensemble.save(path)
    tensors, header = read_model_file(path, format_name="patchcore-ensemble")
    bad = json.loads(json.dumps(header))
    bad["members"][1]["config"]["resize"] = 48
    write_model_file(tmp_path / "bad.model", tensors, bad)
    with pytest.raises(ModelFileError, match="resize"):
        load_model(tmp_path / "bad.model", device="cpu")
    bad = json.loads(json.dumps(header))
    bad["ensemble"]["pixel"][0][1] = 0.0
    write_model_file(tmp_path / "bad.model", tensors, bad)
    with pytest.raises(ModelFileError, match="scale must be positive"):
        load_model(tmp_path / "bad.model", device="cpu")
    extra = {**tensors, "member2.memory_bank": tensors["member0.memory_bank"].clone()}
    write_model_file(tmp_path / "bad.model", extra, header)
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        load_model(tmp_path / "bad.model", device="cpu")


def test_images_of_several_sizes(ensemble, data):
    """Each image its own grid, as a single model: maps come as a list, aligned with every member's."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)]
    result = ensemble.predict(images)
    member = ensemble.members[0].predict(images)
    assert isinstance(result.maps, list) and [m.shape for m in result.maps] == [m.shape for m in member.maps]
    assert result.scores.shape == (2,)


def test_build_and_update(ensemble, train, test_images):
    assert isinstance(build_model(CONFIG, device="cpu"), PatchCoreEnsemble)
    assert type(build_model(dataclasses.replace(CONFIG, backbone="resnet18_random"), device="cpu")) is PatchCore
    twin = PatchCoreEnsemble.from_members([PatchCore(m.config, device="cpu") for m in ensemble.members])
    twin.set_state(ensemble.state_)
    served = twin.predict(test_images[2:])
    before = twin.memory_bank_.shape[0]
    twin.update(test_images[:2])
    assert twin.memory_bank_.shape[0] > before
    assert twin.update_report_.bank_after == twin.memory_bank_.shape[0]
    assert twin.image_threshold_ == ensemble.image_threshold_  # kept, as a single model keeps its thresholds
    assert not torch.equal(twin.predict(test_images[:2]).scores, ensemble.predict(test_images[:2]).scores)
    assert ensemble.predict(test_images[2:]).scores.equal(served.scores)  # the original is untouched


def test_cli_fit_and_predict_an_ensemble(data, tmp_path):
    from patchcore.app.cli import main

    model = tmp_path / "e.model"
    assert main(["fit", str(data / "train" / "good"), "-o", str(model), "--backbone", BACKBONES, "--resize", "64",
                 "--crop", "none", "--coreset-ratio", "0.1", "--device", "cpu", "--quiet"]) == 0
    assert isinstance(load_model(model, device="cpu"), PatchCoreEnsemble)
    out = tmp_path / "out"
    assert main(["predict", str(model), str(data / "test" / "good"), "-o", str(out), "--device", "cpu",
                 "--quiet"]) == 0
    assert (out / "scores.csv").is_file() and len(list((out / "heatmaps").glob("*.png"))) == 3


def test_served_like_a_single_model(ensemble, test_images, tmp_path):
    """`patchcore serve` loads an ensemble file through the same registry and scores it as the library does."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from patchcore.app.server.api import create_app
    from patchcore.app.server.settings import ServerSettings

    folder = tmp_path / "models"
    folder.mkdir()
    ensemble.save(folder / "ens.model")
    settings = ServerSettings(models_dir=folder, review_dir=folder / "review", token="t" * 32, device="cpu",
                              max_wait_ms=5.0)
    with TestClient(create_app(settings)) as client:
        body = client.post("/v1/models/ens/predict", files={"file": ("x.png", test_images[-1].read_bytes())}).json()
    expected = ensemble.predict([test_images[-1]])
    assert body["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5, abs=1e-5)
    assert body["threshold"] == pytest.approx(ensemble.image_threshold_)


def test_fit_on_images_of_several_sizes(tmp_path):
    """Geometry auto on a varied training set: every member chooses the same scale, maps per image align."""
    data = make_category(tmp_path / "varied", n_train=12, n_test_good=2, n_test_per_defect=1, seed=0,
                         sizes=[(64, 64), (64, 112), (96, 64)])
    config = dataclasses.replace(CONFIG, resize=256, crop=224, pixel_budget=64 * 64)  # the defaults: auto applies
    model = PatchCoreEnsemble(config, device="cpu").fit(sorted((data / "train" / "good").glob("*.png")))
    assert len({m.config.scale for m in model.members}) == 1 and model.members[0].config.scale is not None
    tests = sorted((data / "test").glob("*/*.png"))
    result = model.predict(tests)
    assert isinstance(result.maps, list) and len({tuple(m.shape) for m in result.maps}) > 1
    for member in model.members:
        assert [m.shape for m in member.predict(tests).maps] == [m.shape for m in result.maps]
