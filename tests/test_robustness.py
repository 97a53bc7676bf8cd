"""No input file can crash a run or blow up its memory (issue 9).

A hostile corpus (tests/hostile.py, built in tmp_path) goes through `patchcore fit`, `predict` and
`evaluate`, each in its own process, so that a native crash or a memory blow-up shows as a failed
assertion here rather than as a dead test runner. Plus a seeded fuzz run of mutated PNG and JPEG files
through read_image, also in a subprocess.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import hostile

# Peak RSS of one CLI process on this corpus. A run with torch imported and resnet18 built measures about
# 0.7 GiB here; before the fix, the 15000 x 15000 bomb alone decoded to 675 MB (and 675 MB more as a tensor)
# and the 1 x 40000 strip asked for gigabytes after the resize, so any of them crosses this bound.
PEAK_RSS_BOUND_MIB = 1400

OPTIONS = ["--backbone", "resnet18_random", "--resize", "64", "--crop", "none", "--batch-size", "4",
           "--coreset-ratio", "0.5", "--quiet", "--device", "cpu"]

# Runs `argv` as a child and reports its exit status and peak RSS (ru_maxrss of its children only).
WRAPPER = """
import json, resource, subprocess, sys
result = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as handle:
    json.dump({"returncode": result.returncode, "peak_rss_mib": peak_kib / 1024,
               "stdout": result.stdout, "stderr": result.stderr}, handle)
"""


def run_measured(args: list[str], tmp_path: Path, timeout: float = 120) -> dict:
    """`python -m patchcore.app.cli ARGS` in a child process: its return code, stderr and peak RSS."""
    report = tmp_path / f"run_{len(list(tmp_path.glob('run_*.json')))}.json"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", WRAPPER, str(report), sys.executable, "-m", "patchcore.app.cli", *args],
                   check=True, timeout=timeout, env=env)
    return json.loads(report.read_text())


def assert_clean_exit(run: dict, expected: int | tuple[int, ...]) -> None:
    assert run["returncode"] >= 0, f"killed by signal {-run['returncode']}:\n{run['stderr'][-3000:]}"
    assert run["returncode"] in (expected if isinstance(expected, tuple) else (expected,)), run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"], run["stderr"][-3000:]
    assert run["peak_rss_mib"] < PEAK_RSS_BOUND_MIB, f"peak RSS {run['peak_rss_mib']:.0f} MiB"


def write_good_images(folder: Path, seed: int, prefix: str = "good") -> list[Path]:
    """Six good 48 x 48 images, one of each kind: RGB and grey PNG, JPEG, EXIF-rotated JPEG and PNG (stored
    turned, the tag turns them back; tests/test_images.py checks the orientation on non-square images), and a
    two-frame TIFF (its first frame is the image)."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [hostile.good_image(seed + i) for i in range(6)]
    files = {
        "rgb.png": hostile.encoded(pictures[0], "PNG"),
        "grey.png": hostile.encoded(pictures[1][..., 0], "PNG"),
        "plain.jpg": hostile.encoded(pictures[2], "JPEG", quality=90),
        "exif_rotated.jpg": hostile.exif_rotated(np.ascontiguousarray(np.rot90(pictures[3], 1)), "JPEG"),
        "exif_rotated.png": hostile.exif_rotated(np.ascontiguousarray(np.rot90(pictures[4], 1)), "PNG"),
        "two_frames.tif": hostile.two_frame_tiff(pictures[5], hostile.good_image(seed + 50, (20, 30))),
    }
    paths = []
    for name, data in files.items():
        paths.append(folder / f"{prefix}_{name}")
        paths[-1].write_bytes(data)
    return paths


def write_hostile_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in hostile.hostile_files().items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    train = root / "train"
    good = write_good_images(train, seed=0) + write_good_images(train, seed=10, prefix="more")
    bad = write_hostile_images(train)
    return root, good, bad


@pytest.fixture(scope="module")
def fitted_model(corpus, tmp_path_factory):
    root, good, bad = corpus
    work = tmp_path_factory.mktemp("fit")
    model = work / "m.model"
    run = run_measured(["fit", str(root / "train"), "-o", str(model), *OPTIONS], work)
    return model, run


def test_fit_skips_every_hostile_file_and_names_it(corpus, fitted_model):
    _, good, bad = corpus
    model, run = fitted_model
    assert_clean_exit(run, (0, 1))  # the model is written; exit 1 where the CLI says "not from every image"
    assert model.is_file()
    for path in bad:
        assert f"{path}:" in run["stderr"], path.name
    for path in good:
        assert str(path) not in run["stderr"]
    assert "limit" in run["stderr"] and "PATCHCORE_MAX_PIXELS" in run["stderr"]  # the bomb says how to go further
    assert "PATCHCORE_MAX_ASPECT_RATIO" in run["stderr"]  # and so does the strip


def test_predict_scores_every_good_file_and_exits_1(corpus, fitted_model, tmp_path):
    root, good, bad = corpus
    model, _ = fitted_model
    out = tmp_path / "out"
    run = run_measured(["predict", str(model), str(root / "train"), "-o", str(out), "--quiet", "--device", "cpu"],
                       tmp_path)
    assert_clean_exit(run, 1)  # done, but some files could not be read
    for path in bad:
        assert str(path) in run["stderr"], path.name
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["file"] for row in rows) == sorted(str(p) for p in good)
    assert all(np.isfinite(float(row["score"])) for row in rows)
    failures = json.loads((out / "scores.json").read_text())["failures"]
    assert sorted(f["file"] for f in failures) == sorted(str(p) for p in bad)


def test_evaluate_with_hostile_training_files_and_a_bad_test_image(tmp_path):
    """Bad training images are skipped (named); an unreadable test image stops evaluate with one line naming
    it and exit 2 (the dataset is broken), never a crash."""
    category = tmp_path / "cat"
    write_good_images(category / "train" / "good", seed=0)
    bad_train = write_hostile_images(category / "train" / "good")
    write_good_images(category / "test" / "good", seed=20)
    broken_test = category / "test" / "good" / "zz_short_idat.png"
    broken_test.write_bytes(hostile.short_idat_png())
    defects = category / "test" / "dent"
    defects.mkdir(parents=True)
    masks = category / "ground_truth" / "dent"
    masks.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(hostile.good_image(40 + i)).save(defects / f"{i:03d}.png")
        mask = np.zeros((48, 48), np.uint8)
        mask[10:20, 10:20] = 255
        Image.fromarray(mask).save(masks / f"{i:03d}_mask.png")
    # --calibration-ratio 0: every training file goes to the fit, which names each one it skips (a file in the
    # held-out calibration share is skipped without a warning line today).
    run = run_measured(["evaluate", str(category), "-o", str(tmp_path / "results"), *OPTIONS,
                        "--calibration-ratio", "0"], tmp_path)
    assert_clean_exit(run, 1)  # the run finishes: its results are partial, each bad file named
    assert "the results are partial" in run["stderr"] and f"test image(s) could not be read or scored: " \
        f"{broken_test}" in run["stderr"]
    record = json.loads((tmp_path / "results" / "cat.json").read_text())
    assert record["partial"] and record["failures"]["test_images"][0].startswith(str(broken_test))
    for path in bad_train:
        assert str(path) in run["stderr"], path.name


def test_fuzzed_png_and_jpeg_files_never_crash_the_decoder(tmp_path):
    """A few hundred seeded byte mutations through read_image, in a child: a native crash is a failure here."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "hostile.py"), "fuzz", "--cases", "400",
                             "--seed", "20240909", "--folder", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode >= 0, f"decoder crashed (signal {-result.returncode}); cases in {tmp_path}"
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["decoded"] + counts["refused"] == 400
    assert counts["decoded"] > 0 and counts["refused"] > 0  # the mutations reach both outcomes


def test_hostile_files_as_masks_and_image_sizes_are_dataset_errors(tmp_path):
    """evaluate reads masks and image sizes itself (datasets.read_mask / image_size): the same corpus, and a
    file in a format outside DECODE_FORMATS, is a DatasetError naming the file there too."""
    from patchcore.errors import DatasetError
    from patchcore.evaluation.datasets import image_size, read_mask

    files = {**hostile.hostile_files(), "pcx_named.png": hostile.encoded(hostile.good_image(3), "PCX")}
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DatasetError, match=f"{name}: unreadable mask"):
            read_mask(path)
        if name not in ("zero_bytes.png", "text.png", "pcx_named.png"):
            continue  # a readable header: the limits and the damage are found when decoding
        with pytest.raises(DatasetError, match=f"{name}: unreadable image"):
            image_size(path)
