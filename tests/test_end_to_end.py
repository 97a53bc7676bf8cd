"""Fit on synthetic normal textures, score pasted defects: the whole pipeline, through the public API."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image

from patchcore import ModelFileError, NotFittedError, PatchCore, PatchCoreConfig
from patchcore.core.thresholds import quantile_threshold
from patchcore.io.model_file import read_model_file, write_model_file


def _test_items(category):
    items = []
    for path in sorted((category / "test").glob("*/*.png")):
        kind = path.parent.name
        mask = None
        if kind != "good":
            mask = np.asarray(Image.open(category / "ground_truth" / kind / f"{path.stem}_mask.png")) > 0
        items.append((path, kind, mask))
    return items


def test_every_defect_scores_above_every_normal_image_and_peaks_inside_it(fitted, category):
    items = _test_items(category)
    result = fitted.predict([path for path, _, _ in items])
    assert result.scores.shape == (len(items),)
    assert result.maps.shape == (len(items), 128, 128)  # input resolution (no crop here)
    normal = [float(s) for s, (_, kind, _) in zip(result.scores, items) if kind == "good"]
    defect = [float(s) for s, (_, kind, _) in zip(result.scores, items) if kind != "good"]
    assert min(defect) > max(normal)
    for anomaly_map, (path, _kind, mask) in zip(result.maps, items):
        if mask is None:
            continue
        peak = np.unravel_index(int(anomaly_map.argmax()), anomaly_map.shape)
        assert mask[peak], f"{path}: heatmap peak {peak} outside the defect"


def test_thresholds_come_from_out_of_sample_training_scores(fitted, category):
    # 20 training images, all in the bank; each scored against a coreset of the other folds' images.
    assert fitted.fit_report_.n_calibration_images == 20 and fitted.n_train_images_ == 20
    nominal = fitted.calibration_scores_
    assert fitted.image_threshold_ == pytest.approx(quantile_threshold(nominal, fitted.config.false_alarm_rate))
    assert "out-of-sample" in fitted.fit_report_.thresholds
    normal = fitted.predict(sorted((category / "test" / "good").glob("*.png")))
    assert torch.equal(normal.labels, normal.scores > fitted.image_threshold_)
    assert torch.equal(normal.masks, normal.maps > fitted.pixel_threshold_)
    result = fitted.predict(sorted((category / "test" / "hole").glob("*.png")))
    assert result.labels is not None and bool(result.labels.all())
    assert result.masks.shape == result.maps.shape and result.masks.dtype == torch.bool


def test_no_threshold_without_enough_images(train_paths):
    model = PatchCore(small_config(backbone="resnet18_random"), device="cpu").fit(train_paths[:6])
    assert model.image_threshold_ is None
    result = model.predict(train_paths[:2])
    assert result.labels is None and result.masks is None


def test_predict_before_fit_is_a_clear_error(train_paths):
    with pytest.raises(NotFittedError, match="not fitted"):
        PatchCore(small_config(), device="cpu").predict(train_paths[:1])


def test_save_load_round_trip_gives_identical_results(fitted, category, tmp_path):
    path = tmp_path / "model.patchcore"
    fitted.save(path)
    loaded = PatchCore.load(path, device="cpu")
    assert loaded.config == fitted.config
    assert torch.equal(loaded.memory_bank_, fitted.memory_bank_.cpu())
    images = sorted((category / "test" / "stain").glob("*.png"))
    a, b = fitted.predict(images), loaded.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert loaded.image_threshold_ == fitted.image_threshold_


def test_same_data_and_seed_give_byte_identical_files(fitted, train_paths, tmp_path):
    torch.manual_seed(999)  # different global RNG state must not matter
    again = PatchCore(small_config(), device="cpu").fit(train_paths)
    fitted.save(tmp_path / "a.model")
    again.save(tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    other_seed = PatchCore(small_config(seed=1), device="cpu").fit(train_paths)
    assert not torch.equal(other_seed.memory_bank_, fitted.memory_bank_)


def test_features_spilled_to_disk_give_the_same_bank(fitted, train_paths, tmp_path):
    spilled = PatchCore(small_config(), device="cpu").fit(train_paths, max_feature_memory=1 << 16, spill_dir=tmp_path)
    assert spilled.fit_report_.features_spilled_to_disk
    assert not fitted.fit_report_.features_spilled_to_disk
    assert torch.equal(spilled.memory_bank_, fitted.memory_bank_)
    assert list(tmp_path.iterdir()) == []  # the temporary feature file is gone


def test_coreset_size_as_count_and_ratio(train_paths):
    model = PatchCore(small_config(backbone="resnet18_random", coreset_size=37, calibration_ratio=0.0),
                      device="cpu").fit(train_paths[:4])
    assert model.memory_bank_.shape[0] == 37
    model = PatchCore(small_config(backbone="resnet18_random", coreset_ratio=0.5, calibration_ratio=0.0),
                      device="cpu").fit(train_paths[:4])
    assert model.memory_bank_.shape[0] == round(0.5 * model.n_train_patches_)


def test_loading_with_other_backbone_weights_fails_clearly(train_paths, tmp_path):
    import torchvision

    for seed, name in ((0, "a.pth"), (1, "b.pth")):
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / name)
    config = small_config(backbone="resnet18", weights=str(tmp_path / "a.pth"), calibration_ratio=0.0)
    model = PatchCore(config, device="cpu").fit(train_paths[:3])
    model.save(tmp_path / "m.model")
    assert PatchCore.load(tmp_path / "m.model", device="cpu").memory_bank_.shape == model.memory_bank_.shape
    with pytest.raises(ModelFileError, match="not the ones this model was fitted with"):
        PatchCore.load(tmp_path / "m.model", device="cpu", weights=str(tmp_path / "b.pth"))


def test_unknown_format_version_and_foreign_files_fail_clearly(fitted, tmp_path):
    fitted.save(tmp_path / "m.model")
    tensors, header = read_model_file(tmp_path / "m.model")
    write_model_file(tmp_path / "future.model", tensors, {**header, "format_version": 99})
    with pytest.raises(ModelFileError, match="version 99"):
        PatchCore.load(tmp_path / "future.model", device="cpu")
    (tmp_path / "photo.model").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ModelFileError, match="photo.model"):
        PatchCore.load(tmp_path / "photo.model", device="cpu")


def test_bank_of_another_backbone_is_rejected(fitted, tmp_path):
    fitted.save(tmp_path / "m.model")
    tensors, header = read_model_file(tmp_path / "m.model")
    header = {k: v for k, v in header.items() if k not in ("format", "format_version")}
    write_model_file(tmp_path / "m.model", {"memory_bank": tensors["memory_bank"][:, :100]}, header)
    with pytest.raises(ModelFileError, match="does not fit backbone"):
        PatchCore.load(tmp_path / "m.model", device="cpu")


def test_in_memory_inputs_match_files(fitted, category):
    paths = sorted((category / "test" / "scratch").glob("*.png"))[:2]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    tensor = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])
    by_path, by_array, by_tensor = fitted.predict(paths), fitted.predict(arrays), fitted.predict(tensor)
    assert torch.equal(by_path.scores, by_array.scores) and torch.equal(by_path.scores, by_tensor.scores)
    assert torch.equal(by_path.maps, by_tensor.maps)


def test_grey_rgba_and_16_bit_inputs_are_scored(fitted, category, tmp_path):
    source = np.asarray(Image.open(sorted((category / "test" / "hole").glob("*.png"))[0]).convert("RGB"))
    grey8 = np.asarray(Image.fromarray(source).convert("L"))
    Image.fromarray(grey8).save(tmp_path / "grey.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    Image.fromarray(source).convert("RGBA").save(tmp_path / "rgba.png")
    result = fitted.predict([tmp_path / "grey.png", tmp_path / "grey16.png", tmp_path / "rgba.png"])
    assert torch.isfinite(result.scores).all()
    # 16-bit and 8-bit versions of one grey picture are the same picture.
    assert float(result.scores[0]) == pytest.approx(float(result.scores[1]), rel=1e-4)


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        PatchCore(PatchCoreConfig(), device="cuda")
