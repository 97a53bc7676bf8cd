"""The command line: options generated from the config, fit/predict outputs, bad input handling."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from patchcore import PatchCoreConfig
from patchcore.app.cli import build_parser, main
from patchcore.app.options import config_from_args
from patchcore.app.predict_folder import output_names


def test_every_config_field_is_a_fit_option_with_the_same_default():
    args = build_parser().parse_args(["fit", "train", "-o", "m"])
    assert config_from_args(args) == PatchCoreConfig()
    help_text = build_parser()._subparsers._group_actions[0].choices["fit"].format_help()
    for f in dataclasses.fields(PatchCoreConfig):
        assert "--" + f.name.replace("_", "-") in help_text


def test_fit_options_parse_into_the_config():
    args = build_parser().parse_args([
        "fit", "t", "-o", "m", "--backbone", "resnet18", "--coreset-ratio", "0.01", "--crop", "none",
        "--resize", "300,500", "--feature-strides", "4,8", "--coreset-size", "100", "--weights", "w.pth"])
    config = config_from_args(args)
    assert config == PatchCoreConfig(backbone="resnet18", coreset_ratio=0.01, crop=None, resize=(300, 500),
                                     feature_strides=(4, 8), coreset_size=100, weights="w.pth")


@pytest.fixture(scope="module")
def model_file(category, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "fabric.model"
    code = main(["fit", str(category / "train" / "good"), "-o", str(path), "--backbone", "efficientnet_lite0",
                 "--resize", "128", "--crop", "none", "--quiet", "--device", "cpu"])
    assert code == 0 and path.is_file()
    return path


def test_predict_writes_scores_heatmaps_overlays_and_masks(model_file, category, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(model_file), str(category / "test" / "good"), str(category / "test" / "hole"),
                 "-o", str(out), "--quiet"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 10
    names = {row["name"] for row in rows}
    assert "good_000" in names and "hole_000" in names  # same stem, two folders: no collision
    for row in rows:
        assert (out / "heatmaps" / f"{row['name']}.png").is_file()
        assert (out / "overlays" / f"{row['name']}.png").is_file()
        assert (out / "masks" / f"{row['name']}.png").is_file()
    summary = json.loads((out / "scores.json").read_text())
    assert summary["image_threshold"] > 0 and summary["failures"] == []
    for row in rows:  # labels follow the calibrated threshold; every hole is caught
        assert row["label"] == ("defect" if float(row["score"]) > summary["image_threshold"] else "good")
        if "hole" in row["name"]:
            assert row["label"] == "defect"


def test_bad_files_are_named_skipped_and_the_exit_code_says_so(model_file, category, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = Image.open(sorted((category / "test" / "good").glob("*.png"))[0])
    good.save(folder / "a_good.png")
    good.convert("L").save(folder / "b_grey.png")
    good.convert("RGBA").save(folder / "c_rgba.png")
    Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257).save(folder / "d_grey16.png")
    raw = (folder / "a_good.png").read_bytes()
    (folder / "e_truncated.png").write_bytes(raw[: len(raw) // 2])
    (folder / "f_text.png").write_text("not an image")
    (folder / "g_empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code = main(["predict", str(model_file), str(folder), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    for bad in ("e_truncated.png", "f_text.png", "g_empty.jpg"):
        assert bad in err
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [row["name"] for row in rows] == ["a_good", "b_grey", "c_rgba", "d_grey16"]
    failures = json.loads((out / "scores.json").read_text())["failures"]
    assert len(failures) == 3


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m.model"), "--quiet"])
    assert code == 2
    assert "no image files" in capsys.readouterr().err
    assert not (tmp_path / "m.model").exists()


def test_predict_with_a_non_model_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.model").write_text("hello")
    code = main(["predict", str(tmp_path / "x.model"), str(tmp_path), "-o", str(tmp_path / "o")])
    assert code == 2
    assert "x.model" in capsys.readouterr().err


def test_output_names_are_unique_and_readable(tmp_path):
    paths = [tmp_path / "test" / "crack" / "000.png", tmp_path / "test" / "good" / "000.png"]
    assert sorted(output_names(paths).values()) == ["crack_000", "good_000"]
    same = [tmp_path / "a.png", tmp_path / "a.png"]
    assert len(set(output_names(same).values())) == 1  # the same file keeps one name


def test_demo_runs_offline_and_reports_where_results_are(tmp_path, capsys):
    code = main(["demo", "-o", str(tmp_path / "demo"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0
    assert "image AUROC on the synthetic test set: 1.000" in err
    assert any((tmp_path / "demo" / "predictions" / "heatmaps").iterdir())


def test_predict_help_says_how_inputs_are_searched_and_named():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["predict"].format_help().split())
    assert "searched recursively" in help_text and "below the common folder" in help_text
    assert "--overwrite" in help_text and "scored once" in help_text


@pytest.mark.parametrize("argv", [
    ["fit", "train", "-o", "m.model", "--max-feature-memory-gb", "inf"],
    ["fit", "train", "-o", "m.model", "--max-feature-memory-gb", "nan"],
    ["fit", "train", "-o", "m.model", "--max-feature-memory-gb", "-1"],
    ["evaluate", "root", "--max-feature-memory-gb", "inf"],
    ["bench", "data", "--throughput-batch", "0"],
    ["bench", "data", "--throughput-batch", "x"],
])
def test_out_of_range_numeric_options_are_a_usage_error_not_a_traceback(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "expected" in err and "Traceback" not in err


def test_bench_output_that_is_a_folder_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import patchcore.app.cli as cli

    def run_bench(*args, **kwargs):
        raise AssertionError("the bench started before its output was checked")

    monkeypatch.setattr(cli, "run_bench", run_bench)
    code = main(["bench", str(tmp_path), "-o", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err
