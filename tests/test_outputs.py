"""What `fit` and `predict` write, and what they leave behind when something goes wrong: output checks
before any work, atomic model writes with normal permissions, results written as they go, a Ctrl-C or a
crash mid-run, earlier results refused or replaced, recursive inputs, repeated files, mixed image sizes."""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import patchcore.io.model_file as model_file
from patchcore import PatchCore
from patchcore.app import predict_folder
from patchcore.app.cli import main
from patchcore.app.predict_folder import collect_inputs, predict_to_folder

FAST = ["--backbone", "resnet18_random", "--resize", "64", "--crop", "none", "--coreset-ratio", "0.5",
        "--batch-size", "4", "--quiet", "--device", "cpu"]


def _strict_json(path: Path):
    """json.loads that refuses NaN and Infinity, as any strict JSON reader does."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(".") or
                  p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def model_path(category, tmp_path_factory):
    """resnet18_random at 64 px, 20 training images (5 held out: thresholds are set)."""
    path = tmp_path_factory.mktemp("outputs") / "fast.model"
    assert main(["fit", str(category / "train" / "good"), "-o", str(path), *FAST]) == 0
    return path


@pytest.fixture
def no_fit(monkeypatch):
    """Fails the test if a fit starts: the checks under test must come before any work."""
    def fit(*args, **kwargs):
        raise AssertionError("fit started before the output was checked")
    monkeypatch.setattr(PatchCore, "fit", fit)


def _train_folder(category, tmp_path, n=4) -> Path:
    folder = tmp_path / "train"
    folder.mkdir()
    for path in sorted((category / "train" / "good").glob("*.png"))[:n]:
        shutil.copy(path, folder / path.name)
    return folder


# ---------------------------------------------------------------------------- fit: the output file
def test_fit_output_that_is_a_folder_fails_before_any_work(category, tmp_path, capsys, no_fit):
    (tmp_path / "models").mkdir()
    code = main(["fit", str(category / "train" / "good"), "-o", str(tmp_path / "models"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err and str(tmp_path / "models") in err
    assert "Traceback" not in err


def test_fit_output_below_a_file_fails_before_any_work(category, tmp_path, capsys, no_fit):
    (tmp_path / "file").write_text("x")
    code = main(["fit", str(category / "train" / "good"), "-o", str(tmp_path / "file" / "sub" / "m.model"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder" in err


def test_fit_output_in_a_folder_that_cannot_be_written_fails_before_any_work(category, tmp_path, capsys, no_fit,
                                                                             monkeypatch):
    # Simulated at the system call, so it also runs as root (which ignores permission bits).
    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(model_file.tempfile, "mkstemp", mkstemp)
    code = main(["fit", str(category / "train" / "good"), "-o", str(tmp_path / "m.model"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write here" in err and "Permission denied" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_fit_output_in_a_read_only_folder(category, tmp_path, capsys, no_fit):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code = main(["fit", str(category / "train" / "good"), "-o", str(folder / "m.model"), *FAST])
    finally:
        folder.chmod(0o755)
    assert code == 2 and "cannot write here" in capsys.readouterr().err


def test_fit_creates_missing_folders_and_the_file_has_umask_permissions(category, tmp_path):
    previous = os.umask(0o027)
    try:
        out = tmp_path / "new" / "deeper" / "m.model"
        assert main(["fit", str(_train_folder(category, tmp_path)), "-o", str(out), *FAST]) == 0
    finally:
        os.umask(previous)
    assert out.is_file()
    assert out.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
    assert _leftovers(tmp_path / "new") == []


def test_fit_full_disk_is_one_clean_error_and_keeps_the_previous_model(category, tmp_path, capsys, monkeypatch,
                                                                       model_path):
    out = tmp_path / "m.model"
    shutil.copy(model_path, out)
    before = out.read_bytes()

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_file.os, "fsync", fsync)
    code = main(["fit", str(_train_folder(category, tmp_path)), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "No space left on device" in err and str(out) in err and "unchanged" in err
    assert "Traceback" not in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.model", "train"]  # no temporary file


def test_fit_with_unreadable_training_images_writes_the_model_and_exits_1(category, tmp_path, capsys):
    folder = _train_folder(category, tmp_path)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (folder / "zz_text.jpg").write_text("not an image")
    out = tmp_path / "m.model"
    code = main(["fit", str(folder), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert out.is_file()
    assert "2 training image(s) could not be read" in err
    assert "zz_broken.png" in err and "zz_text.jpg" in err


@pytest.mark.parametrize("where", ["coreset", "write"])
def test_interrupted_fit_leaves_no_partial_file(category, tmp_path, capsys, monkeypatch, model_path, where):
    import patchcore.estimator.model as estimator_model

    out = tmp_path / "models" / "m.model"
    out.parent.mkdir()
    shutil.copy(model_path, out)
    before = out.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "coreset":
        monkeypatch.setattr(estimator_model, "greedy_coreset", interrupt)
    else:  # Ctrl-C while the bytes are being written
        monkeypatch.setattr(model_file.os, "fsync", interrupt)
    code = main(["fit", str(_train_folder(category, tmp_path)), "-o", str(out), *FAST])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.model"]
    out.unlink()  # and with no previous model: no file at all
    assert main(["fit", str(tmp_path / "train"), "-o", str(out), *FAST]) == 130
    assert list(out.parent.iterdir()) == []


# ---------------------------------------------------------------------------- predict: the output folder
def test_predict_refuses_earlier_results_and_overwrite_replaces_them_cleanly(model_path, category, tmp_path,
                                                                            capsys):
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(category / "test"), "-o", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")  # not ours: never touched
    first = (out / "scores.csv").read_bytes()
    capsys.readouterr()
    code = main(["predict", str(model_path), str(category / "test" / "good"), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "earlier run" in err and "--overwrite" in err
    assert (out / "scores.csv").read_bytes() == first  # refused before any change
    code = main(["predict", str(model_path), str(category / "test" / "good"), "-o", str(out), "--quiet",
                 "--overwrite"])
    assert code == 0
    names = {row["name"] for row in _csv_rows(out / "scores.csv")}
    assert len(names) == 6
    for sub in ("heatmaps", "overlays", "masks"):  # exactly the new run's pictures: no old ones mixed in
        assert {p.stem for p in (out / sub).iterdir()} == names
    assert (out / "notes.txt").read_text() == "mine"
    assert _strict_json(out / "scores.json")["n_scored"] == 6


@pytest.mark.parametrize("case", ["file", "below-a-file", "cannot-write", "heatmaps-is-a-file"])
def test_predict_output_problems_fail_before_any_work(model_path, category, tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "out"
    if case == "file":
        out.write_text("x")
    elif case == "below-a-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    elif case == "cannot-write":
        def mkstemp(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(model_file.tempfile, "mkstemp", mkstemp)
    else:
        out.mkdir()
        (out / "heatmaps").write_text("x")

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(PatchCore, "load", load)
    code = main(["predict", str(model_path), str(category / "test" / "good"), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(tmp_path) in err


# ---------------------------------------------------------------------------- predict: inputs
def test_a_folder_is_searched_recursively_with_unique_names(model_path, category, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(category / "test"), "-o", str(out), "--quiet"]) == 0
    rows = _csv_rows(out / "scores.csv")
    expected = {f"{kind}_{i:03d}" for kind, n in (("good", 6), ("hole", 4), ("scratch", 4), ("stain", 4))
                for i in range(n)}
    assert {row["name"] for row in rows} == expected
    summary = _strict_json(out / "scores.json")
    assert summary["status"] == "complete" and summary["complete"] and not summary["interrupted"]
    assert "below the common folder" in summary["naming"]
    assert summary["n_scored"] == summary["n_inputs"] == 18


def test_the_same_file_given_twice_is_scored_once(model_path, category, tmp_path, capsys):
    good = category / "test" / "good"
    one = good / "000.png"
    out = tmp_path / "out"
    code = main(["predict", str(model_path), str(one), str(good), str(good / ".." / "good" / "000.png"),
                 "-o", str(out), "--quiet"])
    assert code == 0
    rows = _csv_rows(out / "scores.csv")
    assert len(rows) == 6 and len({row["name"] for row in rows}) == 6
    repeats = _strict_json(out / "scores.json")["repeated_inputs"]
    assert len(repeats) == 2 and all(r["same_as"] == str(one) for r in repeats)


def test_names_that_differ_only_in_case_or_extension_do_not_clash(model_path, category, tmp_path):
    source = sorted((category / "test" / "good").glob("*.png"))[0]
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    for name in ("x.png", "X.PNG", "x.jpg", "a/b.png", "a_b.png"):
        Image.open(source).convert("RGB").save(folder / name)
    model = PatchCore.load(model_path, device="cpu")
    rows, failures = predict_to_folder(model, collect_inputs([folder]), tmp_path / "out")
    assert failures == [] and len(rows) == 5
    names = [row["name"] for row in rows]
    assert len({n.casefold() for n in names}) == 5
    assert len(list((tmp_path / "out" / "heatmaps").iterdir())) == 5


def test_an_output_folder_inside_the_input_folder_is_not_scored(model_path, category, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(category / "test" / "hole", folder)
    out = folder / "results"
    for _ in range(2):
        assert main(["predict", str(model_path), str(folder), "-o", str(out), "--quiet", "--overwrite"]) == 0
        assert len(_csv_rows(out / "scores.csv")) == 4  # not its own heatmaps of the run before


def test_a_symlink_loop_in_an_input_folder_terminates(model_path, category, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(category / "test" / "hole", folder / "sub")
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    paths = collect_inputs([folder])
    assert len(paths) == 4  # symbolic links to folders are not followed


def test_images_of_different_sizes_are_scored_each_at_its_own_size(category, tmp_path):
    """resize none: every image keeps its size, so one batch can hold maps of different sizes."""
    model_out = tmp_path / "none.model"
    train = _train_folder(category, tmp_path, n=4)
    args = [a if a != "64" else "none" for a in FAST]
    assert main(["fit", str(train), "-o", str(model_out), *args]) == 0
    source = Image.open(sorted((category / "test" / "hole").glob("*.png"))[0]).convert("RGB")
    folder = tmp_path / "sizes"
    folder.mkdir()
    sizes = {"a": (128, 128), "b": (96, 160), "c": (128, 128), "d": (64, 40), "e": (130, 70)}  # (H, W)
    for name, (h, w) in sizes.items():
        source.resize((w, h)).save(folder / f"{name}.png")
    out = tmp_path / "out"
    assert main(["predict", str(model_out), str(folder), "-o", str(out), "--quiet", "--save-maps"]) == 0
    rows = _csv_rows(out / "scores.csv")
    assert [row["name"] for row in rows] == list(sizes)
    for name, (h, w) in sizes.items():
        assert Image.open(out / "heatmaps" / f"{name}.png").size == (w, h)
        assert np.load(out / "maps" / f"{name}.npy").shape == (h, w)


# ---------------------------------------------------------------------------- predict: interrupted or failed
def _predict_batch_failing_at(monkeypatch, call: int, error: BaseException):
    """The scoring core (one call per same-size run of a batch) raises `error` at its call-th call."""
    real = PatchCore._score_stack
    calls = {"n": 0}

    def score_stack(self, images, fitted, **options):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return real(self, images, fitted, **options)

    monkeypatch.setattr(PatchCore, "_score_stack", score_stack)


def test_ctrl_c_mid_run_leaves_valid_results_that_say_so(model_path, category, tmp_path, monkeypatch, capsys):
    _predict_batch_failing_at(monkeypatch, 3, KeyboardInterrupt())  # 2 batches of 4 done
    out = tmp_path / "out"
    code = main(["predict", str(model_path), str(category / "test"), "-o", str(out), "--quiet"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    rows = _csv_rows(out / "scores.csv")
    assert len(rows) == 8
    summary = _strict_json(out / "scores.json")
    assert summary["status"] == "interrupted" and summary["interrupted"] and not summary["complete"]
    assert summary["n_scored"] == 8 and summary["n_inputs"] == 18
    assert [r["name"] for r in summary["images"]] == [r["name"] for r in rows]
    for sub in ("heatmaps", "overlays", "masks"):
        assert {p.stem for p in (out / sub).iterdir()} == {r["name"] for r in rows}
    assert _leftovers(out) == []


def test_a_crash_mid_run_leaves_valid_results_that_say_so(model_path, category, tmp_path, monkeypatch, capsys):
    _predict_batch_failing_at(monkeypatch, 2, RuntimeError("simulated bug"))
    out = tmp_path / "out"
    code = main(["predict", str(model_path), str(category / "test"), "-o", str(out), "--quiet"])
    assert code == 3
    assert len(_csv_rows(out / "scores.csv")) == 4
    summary = _strict_json(out / "scores.json")
    assert summary["status"] == "failed" and not summary["complete"] and "simulated bug" in summary["error"]


def test_a_full_disk_mid_run_is_a_clean_error(model_path, category, tmp_path, monkeypatch, capsys):
    real = predict_folder._save_png
    calls = {"n": 0}

    def save_png(array, path):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(array, path)

    monkeypatch.setattr(predict_folder, "_save_png", save_png)
    out = tmp_path / "out"
    code = main(["predict", str(model_path), str(category / "test"), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    summary = _strict_json(out / "scores.json")
    assert summary["status"] == "failed" and summary["n_scored"] == len(_csv_rows(out / "scores.csv")) == 4


def test_sigint_to_a_real_process_leaves_valid_interrupted_results(model_path, category, tmp_path):
    """The real signal path: SIGINT once the first rows are on disk (each batch slowed down to make room)."""
    out = tmp_path / "out"
    script = ("import sys, time\n"
              "from patchcore import PatchCore\n"
              "real = PatchCore._score_stack\n"
              "def slow(self, images, fitted, **options):\n"
              "    time.sleep(0.5)\n"
              "    return real(self, images, fitted, **options)\n"
              "PatchCore._score_stack = slow\n"
              "from patchcore.app.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", script, "predict", str(model_path), str(category / "test"),
                                "-o", str(out), "--quiet", "--device", "cpu"],
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "scores.csv").is_file() and len((out / "scores.csv").read_text().splitlines()) > 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()
    summary = _strict_json(out / "scores.json")
    rows = _csv_rows(out / "scores.csv")
    assert summary["interrupted"] and not summary["complete"]
    assert 0 < len(rows) == summary["n_scored"] < 18
    assert _leftovers(out) == []


# ---------------------------------------------------------------------------- scores are always valid JSON
def test_non_finite_scores_are_failures_and_the_json_stays_valid(model_path, category, tmp_path):
    model = PatchCore.load(model_path, device="cpu")
    # What a NaN distance scale did before load refused it: every score NaN.
    model.set_state(model.state_.replace(distance_scale=float("nan")))
    rows, failures = predict_to_folder(model, sorted((category / "test" / "good").glob("*.png")), tmp_path / "o")
    assert rows == [] and len(failures) == 6
    summary = _strict_json(tmp_path / "o" / "scores.json")
    assert summary["n_failed"] == 6 and "non-finite" in summary["failures"][0]["error"]


@pytest.mark.parametrize("option", ["--threshold", "--pixel-threshold"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_thresholds_are_refused(model_path, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        main(["predict", str(model_path), str(tmp_path), "-o", str(tmp_path / "o"), f"{option}={value}"])
    assert info.value.code == 2 and "finite" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 need a byte-named file system")
def test_file_names_that_are_not_utf8_or_hold_newlines_give_valid_tables(model_path, category, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    source = sorted((category / "test" / "good").glob("*.png"))
    shutil.copy(source[0], os.fsdecode(os.fsencode(str(folder)) + b"/bad\xffname.png"))
    shutil.copy(source[1], folder / "with,comma\nnewline.png")
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(folder), "-o", str(out), "--quiet"]) == 0
    rows = _csv_rows(out / "scores.csv")  # read as UTF-8
    assert len(rows) == 2 and any(row["file"].endswith("bad\\xffname.png") for row in rows)
    json.loads((out / "scores.json").read_bytes().decode("utf-8"))
    names = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert names == ["bad\ufffdname.png", "with,comma_newline.png"]


def test_the_output_folder_given_as_the_input_folder_is_a_clear_error(model_path, category, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(category / "test" / "hole", folder)
    code = main(["predict", str(model_path), str(folder), "-o", str(folder), "--quiet"])
    assert code == 2 and "outside the output folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------- predict: images the model refuses
def test_an_image_of_another_aspect_than_an_exact_resize_is_a_failure_naming_it(category, tmp_path, capsys):
    """predict applies the estimator's per-file input checks: the odd image fails, the rest are scored."""
    model_out = tmp_path / "exact.model"
    train = _train_folder(category, tmp_path, n=4)
    args = [a if a != "64" else "64,64" for a in FAST]
    assert main(["fit", str(train), "-o", str(model_out), *args]) == 0
    folder = tmp_path / "in"
    shutil.copytree(category / "test" / "hole", folder)
    source = Image.open(sorted(folder.glob("*.png"))[0]).convert("RGB")
    source.resize((256, 64)).save(folder / "wide.png")  # H/W 0.25 against the model's 1.0
    out = tmp_path / "out"
    code = main(["predict", str(model_out), str(folder), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "wide.png" in err and "aspect ratio" in err
    names = [row["name"] for row in _csv_rows(out / "scores.csv")]
    assert "wide" not in names and len(names) == len(list(folder.glob("*.png"))) - 1


def test_a_run_the_model_refuses_is_retried_image_by_image(model_path, category, tmp_path, monkeypatch):
    """An InputError while scoring a run: the batch's images are scored one by one (one refused alone is a
    failure naming it), then batches resume."""
    from patchcore.errors import InputError

    real = PatchCore._score_stack
    sizes: list[int] = []  # the batch size of each call

    def score_stack(self, images, fitted, **options):
        sizes.append(images.shape[0])
        if len(sizes) == 1:
            raise InputError("simulated refusal of a run")
        if len(sizes) == 4:  # the third image, alone
            raise InputError("simulated refusal of one image")
        return real(self, images, fitted, **options)

    monkeypatch.setattr(PatchCore, "_score_stack", score_stack)
    paths = sorted((category / "test").glob("*/*.png"))  # 18 images, batches of 4
    rows, failures = predict_to_folder(PatchCore.load(model_path, device="cpu"), paths, tmp_path / "out")
    assert sizes == [4, 1, 1, 1, 1, 4, 4, 4, 2]
    assert [str(f.path) for f in failures] == [str(paths[2])] and "simulated refusal of one image" in str(failures[0])
    assert [row["file"] for row in rows] == [str(p) for p in paths if p != paths[2]]
