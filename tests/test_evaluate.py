"""`patchcore evaluate` end to end on tiny synthetic data, plus its pieces against oracles."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, precision_score, recall_score

import patchcore.evaluation.evaluate as evaluate_module
from patchcore.app.cli import main
from patchcore.config import PatchCoreConfig
from patchcore.evaluation.datasets import load_split
from patchcore.evaluation.evaluate import METRICS, evaluate_category, resolution_text, threshold_metrics
from patchcore.evaluation.synthetic import fabric_texture, make_category, paste_defect
from patchcore.io.preprocess import Preprocess

FAST = ["--backbone", "resnet18_random", "--resize", "64", "--crop", "none", "--batch-size", "8",
        "--device", "cpu", "--quiet"]
FAST_CONFIG = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, batch_size=8)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    # 12 training images: >= 10, so fit holds some out and calibrates a decision threshold.
    make_category(root / "fabric", n_train=12, n_test_good=3, n_test_per_defect=2, size=64, seed=0)
    make_category(root / "weave", n_train=12, n_test_good=3, n_test_per_defect=2, size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def evaluated(mvtec_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = main(["evaluate", str(mvtec_root), "-o", str(out), *FAST])
    return code, out


def test_cli_writes_json_and_markdown(evaluated):
    code, out = evaluated
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["fabric.json", "report.html", "results.md", "summary.json",
                                                     "weave.json"]
    page = (out / "report.html").read_text()
    for category in ("fabric", "weave"):  # one section per category, its curves and its gallery
        assert f'data-category="{category}"' in page or f">{category}<" in page
    assert page.count("data:image/png;base64,") >= 10 and "http" not in page.split("<body", 1)[1]
    record = json.loads((out / "fabric.json").read_text())
    for name in METRICS:
        assert 0.0 <= record["metrics"][name] <= 1.0, name
    assert record["pixel_resolution"].startswith("pixel metrics at each image's original resolution (64x64;")
    assert set(record["per_defect_type"]) == {"hole", "scratch", "stain"}
    for values in record["per_defect_type"].values():
        assert values["n"] == 2 and 0 <= values["image_auroc"] <= 1 and 0 <= values["aupro"] <= 1
    assert PatchCoreConfig.from_dict(record["settings"]) == FAST_CONFIG  # the full config, CLI options applied
    assert record["package_version"]
    assert record["n_images"]["test"] == 9 and record["n_images"]["test_defect"] == 6
    timings = record["timings"]
    assert timings["fit_seconds"] >= timings["coreset_seconds"] > 0
    assert timings["predict_ms_per_image"] > 0 and timings["peak_rss_mib"] > 50
    files = [(i["file"], i["label"]) for i in record["images"]]
    assert ("test/good/000.png", 0) in files and ("test/stain/001.png", 1) in files
    assert all(isinstance(i["score"], float) for i in record["images"])


def test_summary_mean_and_markdown(evaluated):
    _, out = evaluated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["categories_done"] == ["fabric", "weave"]
    per = {c["category"]: c["metrics"] for c in summary["categories"]}
    for name in METRICS:
        assert summary["mean"][name] == pytest.approx((per["fabric"][name] + per["weave"][name]) / 2)
    text = (out / "results.md").read_text()
    assert ("| category | image AUROC | pixel AUROC | AUPRO | image F1-max | pixel F1-max | fit s (coreset s) "
            "| predict ms/img | peak RSS MiB |") in text
    assert "| fabric | " in text and "| **mean** | " in text
    assert "pixel metrics at each image's original resolution (64x64;" in text
    assert f"{100 * summary['mean']['image_auroc']:.1f}" in text


def test_training_threshold_results_are_labelled(evaluated):
    _, out = evaluated
    record = json.loads((out / "fabric.json").read_text())
    at = record["at_training_threshold"]
    assert "out-of-sample scores" in at["description"] and "no test image" in at["description"]
    assert at["target_false_alarm_rate"] == 0.01 and 0 <= at["observed_false_alarm_rate"] <= 1
    assert at["expected_false_alarm_interval"][0] <= at["expected_false_alarm_rate"] <= \
        at["expected_false_alarm_interval"][1]
    assert at["n_held_out_train_images"] == record["n_images"]["train_held_out_for_threshold"] >= 1
    predicted = [i["predicted_defect"] for i in record["images"]]
    assert predicted == [i["score"] > at["threshold"] for i in record["images"]]
    correct = [p == bool(i["label"]) for p, i in zip(predicted, record["images"])]
    assert at["accuracy"] == pytest.approx(np.mean(correct))
    # The test-fitted F1-max threshold is not reported anywhere.
    assert "image_f1_threshold" not in json.dumps(record)
    assert "At the model's own threshold (set from out-of-sample training scores" in (out / "results.md").read_text()


def test_threshold_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    scores = rng.normal(size=50) + labels
    got = threshold_metrics(labels, scores, 0.4)
    predicted = scores > 0.4
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert got["precision"] == pytest.approx(precision_score(labels, predicted))
    assert got["recall"] == pytest.approx(recall_score(labels, predicted))
    assert threshold_metrics([0, 1], [0.1, 0.2], 5.0)["precision"] is None  # nothing flagged: undefined


def test_mask_geometry_follows_the_image_preprocessing():
    # A picture that is its own mask: the bilinear image geometry and the nearest-neighbour mask
    # geometry must land on the same pixels (up to the resampled edge).
    mask = np.zeros((90, 150), bool)
    mask[20:50, 30:100] = True
    mask[60:70, 110:140] = True
    picture = torch.from_numpy(mask.astype(np.uint8) * 255).expand(3, -1, -1).contiguous()
    for resize, crop in [(64, 56), ((40, 100), None), (None, (80, 120)), (90, None)]:
        pre = Preprocess(resize, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        got = pre.mask_geometry(mask)
        assert got.dtype == bool and got.shape == pre.output_size(90, 150)
        image_side = pre.geometry(picture)[0].numpy() > 127
        assert np.mean(got == image_side) > 0.97, (resize, crop)
    crop_only = Preprocess(None, (80, 120), (0.0,) * 3, (1.0,) * 3)
    assert np.array_equal(crop_only.mask_geometry(mask), mask[5:85, 15:135])  # exact: no resampling


def test_notes_when_the_crop_hides_the_image_or_a_defect(tmp_path):
    root = tmp_path / "parts"
    for folder, name in (("train", "t.png"), ("good", "g.png"), ("dent", "d.png")):
        (root / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 100), np.uint8)).save(root / folder / name)
    split = load_split(root)
    square = Preprocess(40, 40, (0.0,) * 3, (1.0,) * 3)
    notes = evaluate_module._view_notes(split, square, {1: np.zeros((40, 40), bool)})
    assert "keeps 40% of a resized 40x100 image" in notes[0] and "--resize H,W --crop none" in notes[0]
    assert "1 defect image(s) have no mask pixel inside the model's view (e.g. d.png)" in notes[1]
    assert evaluate_module._view_notes(split, Preprocess((40, 100), None, (0.0,) * 3, (1.0,) * 3), {}) == []


def test_resolution_text():
    assert resolution_text(PatchCoreConfig(), (224, 224)) == \
        "pixel metrics at 224x224 model input geometry (resize 256, centre crop 224)"


def test_one_bit_masks_give_the_same_pixel_metrics(tmp_path):
    root = make_category(tmp_path / "fabric", n_train=6, n_test_good=2, n_test_per_defect=1, size=64)
    before = evaluate_category(load_split(root), FAST_CONFIG, device="cpu")["metrics"]
    for mask in (root / "ground_truth").glob("*/*_mask.png"):
        Image.fromarray(np.asarray(Image.open(mask)) > 0).save(mask)  # {0, 255} -> 1-bit {0, 1}
    assert Image.open(next((root / "ground_truth").glob("*/*_mask.png"))).mode == "1"
    after = evaluate_category(load_split(root), FAST_CONFIG, device="cpu")["metrics"]
    assert after == before and after["pixel_auroc"] is not None


def test_missing_mask_exits_2_naming_the_image(tmp_path, capsys):
    root = make_category(tmp_path / "fabric", n_train=4, n_test_good=1, n_test_per_defect=1, size=32)
    (root / "ground_truth" / "hole" / "000_mask.png").unlink()
    assert main(["evaluate", str(root), "-o", str(tmp_path / "out"), *FAST]) == 2
    assert "hole/000.png" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before any fitting or writing


def _grey_set(root, *, n_train, n_good, n_defect, bits, suffix, masks, rng):
    """Rectangular 40 x 100 greyscale images in the folder layout."""
    def save(image, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = image.astype(np.float32).mean(axis=2)
        if bits == 16:
            Image.fromarray(np.round(grey * 257).astype(np.uint16)).save(path)
        else:
            Image.fromarray(np.round(grey).astype(np.uint8)).save(path)

    for i in range(n_train):
        save(fabric_texture(rng, 100)[:40], root / "train" / "good" / f"{i:03d}{suffix}")
    for i in range(n_good):
        save(fabric_texture(rng, 100)[:40], root / "good" / f"{i:03d}{suffix}")
    for i in range(n_defect):
        image, mask = paste_defect(fabric_texture(rng, 100)[:40].copy(), rng, "hole")
        save(image, root / "hole" / f"{i:03d}{suffix}")
        if masks:
            (root / "masks" / "hole").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / "hole" / f"{i:03d}.png")


@pytest.mark.parametrize("bits, suffix, masks", [(8, ".jpg", False), (16, ".png", True)])
def test_grey_rectangular_folder_layout(tmp_path, bits, suffix, masks):
    root = tmp_path / "data" / "sheet"
    _grey_set(root, n_train=6, n_good=3, n_defect=3, bits=bits, suffix=suffix, masks=masks,
              rng=np.random.default_rng(bits))
    if bits == 16:
        assert Image.open(root / "good" / "000.png").mode.startswith("I")
    out = tmp_path / "out"
    args = ["evaluate", str(tmp_path / "data"), "--category", "sheet", "-o", str(out), *FAST,
            "--resize", "40,100", "--crop", "none"]
    assert main(args) == 0
    record = json.loads((out / "sheet.json").read_text())
    assert record["layout"] == "folder"
    assert 0.0 <= record["metrics"]["image_auroc"] <= 1.0 and record["metrics"]["image_f1_max"] > 0
    if masks:
        assert record["pixel_resolution"].startswith("pixel metrics at each image's original resolution (40x100;")
        assert all(record["metrics"][m] is not None for m in METRICS)
    else:
        assert record["pixel_resolution"] == "no pixel metrics (no ground-truth masks)"
        assert all(record["metrics"][m] is None for m in ("pixel_auroc", "aupro", "pixel_f1_max"))
        assert "| sheet | " in (out / "results.md").read_text()
    # Fewer than 10 training images: no threshold, and the results say so.
    assert "no decision threshold" in record["at_training_threshold"]["description"]


def test_a_failing_category_is_named_and_the_others_are_evaluated(mvtec_root, tmp_path, monkeypatch, capsys):
    real = evaluate_module.evaluate_category

    def first_fails(split, *args, **kwargs):
        if split.name == "fabric":
            raise RuntimeError("out of memory")
        return real(split, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_category", first_fails)
    out = tmp_path / "out"
    assert main(["evaluate", str(mvtec_root), "-o", str(out), *FAST]) == 3  # internal error: traceback, exit 3
    err = capsys.readouterr().err
    assert "fabric: failed with an internal error" in err and "RuntimeError: out of memory" in err
    assert (out / "weave.json").is_file() and not (out / "fabric.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["categories_done"] == ["weave"] and not summary["complete"] and summary["partial"]
    assert summary["categories_failed"] == [{"category": "fabric", "error": "RuntimeError: out of memory",
                                             "internal": True}]
    results = (out / "results.md").read_text()
    assert "Incomplete: 1 of 2" in results and "Failed: fabric: RuntimeError: out of memory" in results
    assert not list(out.glob(".*.tmp"))


def test_original_and_model_resolution_agree_when_the_geometry_is_the_identity(tmp_path):
    root = make_category(tmp_path / "fabric", n_train=6, n_test_good=2, n_test_per_defect=2, size=64)
    original = evaluate_category(load_split(root), FAST_CONFIG, device="cpu")
    model = evaluate_category(load_split(root), FAST_CONFIG, device="cpu", pixel_resolution="model")
    assert model["pixel_resolution"].startswith("pixel metrics at 64x64 model input geometry")
    for name in ("pixel_auroc", "aupro"):
        assert original["metrics"][name] == pytest.approx(model["metrics"][name], abs=2e-3), name


def test_original_resolution_counts_what_the_crop_hides(tmp_path):
    """128 x 128 images, resize 64 and crop 32: the model sees the middle quarter; full-resolution pixel
    metrics say how many defect pixels it never saw and count them as not flagged, unlike model-geometry
    metrics, which only look inside the crop."""
    root = make_category(tmp_path / "fabric", n_train=6, n_test_good=2, n_test_per_defect=2, size=128)
    config = dataclasses.replace(FAST_CONFIG, resize=64, crop=32)
    original = evaluate_category(load_split(root), config, device="cpu")
    text = original["pixel_resolution"]
    share = float(text.split("); ")[1].split("%")[0])
    assert 0 < share < 100 and "(128x128;" in text and "from the 32x32 model input" in text
    assert original["metrics"]["pixel_auroc"] < 1.0
