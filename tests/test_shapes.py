"""Parts of every shape and size end to end: fit, predict (with and without --full-resolution), evaluate and
serve on one synthetic set of elongated, rotated, varied-size, square and tiny (1 x 2) images, with the
defaults (geometry auto: one scale for every image). And an evaluation that never loses its run."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import patchcore.evaluation.evaluate as evaluate_module
from patchcore import PatchCore
from patchcore.app.cli import main
from patchcore.evaluation.synthetic import make_category
from patchcore.io.sizing import resized_size

# Elongated (two heights, as parts vary), rotated, wide, square-ish and tiny.
SHAPES = [(128, 48), (124, 48), (48, 128), (96, 80), (70, 110), (1, 2)]
FAST = ["--backbone", "resnet18_random", "--batch-size", "4", "--device", "cpu", "--quiet",
        "--pixel-budget", str(64 * 64), "--coreset-ratio", "0.2"]


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    return make_category(tmp_path_factory.mktemp("varied") / "parts", n_train=12, n_test_good=4, n_test_per_defect=2,
                         sizes=SHAPES, seed=3)


@pytest.fixture(scope="module")
def model_path(varied, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "parts.model"
    assert main(["fit", str(varied / "train" / "good"), "-o", str(path), *FAST]) == 0
    return path


def _sizes(folder):
    return {p.stem: Image.open(p).size[::-1] for p in sorted(folder.rglob("*.png"))}


def test_evaluate_with_the_defaults_on_varied_shapes(varied, tmp_path):
    """It crashed in the report stage ('masks must map test indices to (496, 192) masks'), after all the work."""
    out = tmp_path / "out"
    assert main(["evaluate", str(varied), "-o", str(out), *FAST]) == 0
    record = json.loads((out / "parts.json").read_text())
    assert record["settings"]["scale"] > 0 and "resize" in record["settings"]  # the geometry fit chose
    assert all(0.0 <= record["metrics"][m] <= 1.0 for m in evaluate_module.METRICS)
    assert record["pixel_resolution"].startswith("pixel metrics at each image's original resolution (")
    assert not record["partial"] and record["n_images"]["test_scored"] == record["n_images"]["test"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6

    model_out = tmp_path / "model-res"
    assert main(["evaluate", str(varied), "-o", str(model_out), "--pixel-resolution", "model", *FAST]) == 0
    at_model = json.loads((model_out / "parts.json").read_text())
    assert at_model["pixel_resolution"].startswith("pixel metrics at each image's model input size (")
    assert at_model["metrics"]["image_auroc"] == record["metrics"]["image_auroc"]
    assert abs(at_model["metrics"]["pixel_auroc"] - record["metrics"]["pixel_auroc"]) < 0.1


def test_predict_writes_each_picture_at_its_own_size(varied, model_path, tmp_path):
    tests = varied / "test"
    own = {f"{p.parent.name}_{p.stem}": Image.open(p).size[::-1] for p in sorted(tests.rglob("*.png"))}
    model = PatchCore.load(model_path, device="cpu")

    full = tmp_path / "full"
    assert main(["predict", str(model_path), str(tests), "-o", str(full), "--full-resolution", "--quiet"]) == 0
    assert _sizes(full / "heatmaps") == own and _sizes(full / "masks") == own

    plain = tmp_path / "plain"
    assert main(["predict", str(model_path), str(tests), "-o", str(plain), "--quiet"]) == 0
    expected = {name: resized_size(*size, None, scale=model.config.scale, align=16) for name, size in own.items()}
    assert _sizes(plain / "heatmaps") == expected
    rows = json.loads((plain / "scores.json").read_text())["images"]
    assert len(rows) == len(own) and all(np.isfinite(r["score"]) for r in rows)


def test_evaluate_keeps_its_run_when_images_fail(varied, tmp_path, capsys):
    """An unreadable test image is a named per-file failure; a skipped training image too; both exit 1."""
    root = tmp_path / "parts"
    shutil.copytree(varied, root)
    (root / "test" / "good" / "001.png").write_bytes(b"not a png at all")
    (root / "train" / "good" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    out = tmp_path / "out"
    assert main(["evaluate", str(root), "-o", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "good/001.png" in err and "002.png" in err and "partial" in err
    record = json.loads((out / "parts.json").read_text())
    assert record["partial"] and len(record["failures"]["test_images"]) == 1
    assert "001.png" in record["failures"]["test_images"][0] and "002.png" in record["failures"]["train_images"][0]
    assert record["n_images"]["test_scored"] == record["n_images"]["test"] - 1
    assert record["metrics"]["image_auroc"] is not None and (out / "report.html").is_file()
    assert json.loads((out / "summary.json").read_text())["partial"]


def test_a_failing_report_keeps_the_metrics(varied, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("simulated drawing bug")

    monkeypatch.setattr(evaluate_module, "_category_report", broken)
    out = tmp_path / "out"
    assert main(["evaluate", str(varied), "-o", str(out), *FAST]) == 0
    record = json.loads((out / "parts.json").read_text())
    assert record["metrics"]["pixel_auroc"] is not None
    assert any("simulated drawing bug" in note for note in record["notes"])


def test_serve_scores_every_shape_as_the_library_does(varied, model_path, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from patchcore.app.server.api import create_app
    from patchcore.app.server.settings import ServerSettings

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_path, models / "parts.model")
    model = PatchCore.load(model_path, device="cpu")
    settings = ServerSettings(models_dir=models, review_dir=tmp_path / "review", token="t" * 24, device="cpu",
                              max_wait_ms=5.0)
    paths = [varied / "test" / "good" / f"{i:03d}.png" for i in range(4)] + [varied / "test" / "hole" / "000.png"]
    with TestClient(create_app(settings)) as client:
        for path in paths:
            buffer = io.BytesIO(path.read_bytes())
            answer = client.post("/v1/models/parts/predict?map=1", files={"file": (path.name, buffer, "image/png")})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["score"] == pytest.approx(float(model.predict(path).scores[0]), rel=1e-5)


def test_bench_on_varied_shapes(varied):
    from patchcore import PatchCoreConfig
    from patchcore.evaluation.bench import run_bench

    config = PatchCoreConfig(backbone="resnet18_random", batch_size=4, pixel_budget=64 * 64, coreset_ratio=0.2)
    result = run_bench(varied, config, device="cpu", throughput_batch=4, latency_images=6)
    assert result["settings"]["config"]["scale"] > 0 and result["latency_ms_batch1_median"] > 0
    assert result["throughput_images_per_s"] > 0 and 0 <= result["image_auroc"] <= 1


def test_the_server_refuses_what_predict_refuses(varied, tmp_path):
    """An exact-size model: an upload 2.6x off its aspect was scored distorted by the server (tensors skipped
    the check that files get); now it is refused as predict(path) refuses it."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from patchcore import PatchCoreConfig
    from patchcore.app.server.api import create_app
    from patchcore.app.server.settings import ServerSettings

    train = sorted((varied / "train" / "good").glob("*.png"))
    config = PatchCoreConfig(backbone="resnet18_random", resize=(64, 24), crop=None, coreset_ratio=0.2)
    model = PatchCore(config, device="cpu").fit([p for p in train if Image.open(p).size[1] > 100])
    models = tmp_path / "models"
    models.mkdir()
    model.save(models / "tall.model")
    wide = varied / "test" / "good" / "002.png"  # 48 x 128: the tall part's aspect turned
    assert Image.open(wide).size == (128, 48)
    settings = ServerSettings(models_dir=models, review_dir=tmp_path / "review", token="t" * 24, device="cpu",
                              max_wait_ms=5.0)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/models/tall/predict", files={"file": ("w.png", wide.read_bytes(), "image/png")})
    assert answer.status_code == 422 and "aspect ratio" in answer.text
