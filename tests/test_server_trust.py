"""Issue 16 on the server: never a label without a score, bounded requests and responses, no orphaned
feedback, feedback that can be listed and withdrawn, updates that leave out (and name) what they cannot take.
Each test failed on the code before its fix."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from patchcore import PatchCore, PatchCoreConfig
from patchcore.app.server import api as server_api
from patchcore.app.server.api import create_app
from patchcore.app.server.settings import ServerSettings
from patchcore.errors import InputError
from patchcore.evaluation.synthetic import fabric_texture

TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def fabric(n: int, seed: int, size: int = 64, *, variant: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [fabric_texture(rng, size) for _ in range(n)]
    return [np.ascontiguousarray(i[..., [2, 0, 1]]) if variant else i for i in images]


@pytest.fixture(scope="module")
def small_model() -> PatchCore:
    """resnet18_random at 64 x 64, 12 images (thresholds set)."""
    config = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, coreset_ratio=0.2, batch_size=4)
    return PatchCore(config, device="cpu").fit(fabric(12, 0))


@pytest.fixture(scope="module")
def native_model() -> PatchCore:
    """resize none: each image is scored at its own size."""
    config = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None, coreset_ratio=0.2, batch_size=4,
                             calibration_ratio=0.0)
    return PatchCore(config, device="cpu").fit(fabric(3, 1))


def settings_for(folder: Path, **changes) -> ServerSettings:
    values = dict(models_dir=folder, review_dir=folder / "review", token=TOKEN, device="cpu", max_wait_ms=1.0)
    values.update(changes)
    return ServerSettings(**values)


@pytest.fixture()
def models_dir(small_model, tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    small_model.save(folder / "fabric.model")
    return folder


def predict(c, data: bytes, query: str = "", model: str = "fabric", kind: str = "image/png"):
    return c.post(f"/v1/models/{model}/predict{query}", files={"file": ("x.png", data, kind)})


def feedback(c, result_id: str, verdict: str = "good"):
    return c.post("/v1/models/fabric/feedback", json={"result_id": result_id, "verdict": verdict}, headers=AUTH)


# ---------------------------------------------------------------------------- never a label without a score
def test_a_non_finite_score_is_an_error_never_a_label_and_is_counted(models_dir):
    """Case: a model yielding non-finite scores was answered "score": null, "label": "good"."""
    with TestClient(create_app(settings_for(models_dir))) as c:
        model = c.app.state.services.registry.get("fabric").model
        real = model.predict_batch

        def nan_scores(images):
            result = real(images)
            return result._replace(scores=torch.full_like(result.scores, float("nan")))

        model.predict_batch = nan_scores
        r = predict(c, png_bytes(fabric(1, 3)[0]))
        assert r.status_code == 500, r.text
        assert "non-finite" in r.json()["detail"] and "label" not in r.json()
        model.predict_batch = real
        assert predict(c, png_bytes(fabric(1, 3)[0])).json()["label"] in ("good", "defect")
        metrics = c.get("/metrics").text
        assert 'patchcore_requests_total{route="/v1/models/{name}/predict",status="500"} 1.0' in metrics


def test_feedback_that_cannot_be_stored_is_no_500_and_leaves_no_orphaned_image(models_dir):
    """Case: feedback on a result without a finite score was a 500 and left an orphaned image."""
    with TestClient(create_app(settings_for(models_dir))) as c:
        result_id = predict(c, png_bytes(fabric(1, 3)[0])).json()["result_id"]
        c.app.state.services.recent.get(result_id)["score"] = math.nan  # as the old server stored it
        r = feedback(c, result_id)
        assert r.status_code == 503 and "nothing was kept" in r.json()["detail"]
        images = models_dir / "review" / "images"
        assert not any(images.iterdir())


def test_500s_are_counted_in_metrics(models_dir, monkeypatch):
    """Case: 500s were missing from /metrics (the exception skipped the counter)."""
    with TestClient(create_app(settings_for(models_dir)), raise_server_exceptions=False) as c:
        def broken(model):
            raise RuntimeError("disk gone")

        monkeypatch.setattr(c.app.state.services.review, "counts", broken)
        assert c.get("/v1/models/fabric").status_code == 500
        assert 'route="/v1/models/{name}",status="500"} 1.0' in c.get("/metrics").text


# ---------------------------------------------------------------------------- start-up and formats
def test_serve_on_a_missing_or_empty_folder_is_refused_and_creates_nothing(tmp_path, capsys):
    """Case: `serve` on a mistyped folder created it, served no model, and /healthz said 200."""
    from patchcore.app.cli import main

    missing = tmp_path / "modles"
    with pytest.raises(InputError, match="no such folder"):
        create_app(settings_for(missing))
    assert main(["serve", str(missing), "--port", "1"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", str(empty), "--port", "1"]) == 2
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("option", [["--max-upload-mb", "nan"], ["--max-upload-mb", "0"], ["--max-pixels", "-5"],
                                    ["--max-queue", "0"], ["--max-wait-ms", "inf"], ["--max-input-pixels", "0"]])
def test_serve_options_out_of_range_are_usage_errors(models_dir, option, capsys):
    """Case: `--max-upload-mb nan` was a traceback."""
    from patchcore.app.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", str(models_dir), *option])
    assert info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_mpo_jpegs_from_cameras_are_accepted_like_the_cli_reads_them(models_dir, small_model, tmp_path):
    """Case: the server refused MPO JPEGs (what many cameras write) with 415; the CLI reads them."""
    frames = [Image.fromarray(a) for a in fabric(2, 4)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    (tmp_path / "camera.jpg").write_bytes(data)
    with TestClient(create_app(settings_for(models_dir))) as c:
        r = predict(c, data, kind="image/jpeg")
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(float(small_model.predict([tmp_path / "camera.jpg"]).scores[0]),
                                                  rel=1e-5)


# ---------------------------------------------------------------------------- bounded requests and responses
def test_one_request_is_bounded_by_its_model_input_size_before_decoding(native_model, tmp_path, monkeypatch):
    """Case: a 105 kB PNG of 6000 x 6000 to a --resize none model took 10.5 GB for one request."""
    folder = tmp_path / "models"
    folder.mkdir()
    native_model.save(folder / "native.model")
    from patchcore.app.server import decode

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the size was checked")

    with TestClient(create_app(settings_for(folder, max_input_pixels=500 * 500))) as c:
        assert predict(c, png_bytes(fabric(1, 5, 96)[0]), model="native").status_code == 200
        monkeypatch.setattr(decode, "read_image", no_decoding)
        r = predict(c, png_bytes(np.zeros((600, 600, 3), np.uint8)), model="native")
        assert r.status_code == 413, r.text
        assert "600 x 600 = 360000 pixels" in r.json()["detail"] and "--max-input-pixels" in r.json()["detail"]


def test_the_response_is_bounded_whatever_the_image_size(native_model, tmp_path, monkeypatch):
    """Case: `?map=1` at 3000 x 3000 returned a 163 MB response. The bounds are scaled down here."""
    folder = tmp_path / "models"
    folder.mkdir()
    native_model.save(folder / "native.model")
    monkeypatch.setattr(server_api, "MAX_MAP_VALUES", 32 * 32)
    monkeypatch.setattr(server_api, "MAX_PICTURE_PIXELS", 40 * 40)
    image = fabric(1, 6, 160)[0]
    image[40:60, 100:120] = 255  # a bright defect: its peak must survive the reduction
    with TestClient(create_app(settings_for(folder))) as c:
        body = predict(c, png_bytes(image), "?map=1&overlay=1&heatmap=1&input=1", model="native").json()
    full = native_model.predict(image).maps[0]
    assert body["map_full_size"] == [160, 160] and body["map_size"] == [32, 32]
    assert np.array(body["map"]).shape == (32, 32)
    assert max(map(max, body["map"])) == pytest.approx(float(full.max()), rel=1e-4)
    assert body["picture_size"] == [40, 40]
    for key in ("overlay_png", "heatmap_png", "input_png"):
        import base64

        assert Image.open(io.BytesIO(base64.b64decode(body[key]))).size == (40, 40)


# ---------------------------------------------------------------------------- review: list, withdraw, left out
def test_feedback_can_be_listed_and_withdrawn_until_an_update_uses_it(models_dir):
    """Must hold 5: review feedback can be listed and withdrawn (API)."""
    with TestClient(create_app(settings_for(models_dir))) as c:
        ids = []
        for image in fabric(3, 7, variant=True):
            result_id = predict(c, png_bytes(image)).json()["result_id"]
            ids.append(feedback(c, result_id).json()["feedback_id"])
        listed = c.get("/v1/models/fabric/feedback").json()
        assert [f["feedback_id"] for f in listed["feedback"]] == ids[::-1]
        assert all(f["status"] == "pending" for f in listed["feedback"])
        stored = models_dir / "review" / listed["feedback"][0]["image"]
        assert stored.is_file()
        assert c.delete(f"/v1/models/fabric/feedback/{ids[2]}").status_code == 401  # the token is needed
        r = c.delete(f"/v1/models/fabric/feedback/{ids[2]}", headers=AUTH)
        assert r.status_code == 200 and r.json()["counts"]["good_pending"] == 2
        assert not stored.exists()
        assert c.delete(f"/v1/models/fabric/feedback/{ids[2]}", headers=AUTH).status_code == 404
        update = c.post("/v1/models/fabric/apply-update", headers=AUTH)
        assert update.status_code == 200 and len(update.json()["rescored"]) == 2
        r = c.delete(f"/v1/models/fabric/feedback/{ids[0]}", headers=AUTH)
        assert r.status_code == 409 and "roll the model back" in r.json()["detail"]
        assert {f["status"] for f in c.get("/v1/models/fabric/feedback").json()["feedback"]} == {"applied"}


def test_an_image_that_cannot_join_an_update_is_named_and_left_out_and_never_blocks_later_updates(models_dir):
    """Case: one feedback image an update cannot take made every later apply-update fail, with no way to
    drop it; must hold 5: it is named and left out, and the update proceeds with the rest."""
    with TestClient(create_app(settings_for(models_dir))) as c:
        ids = [feedback(c, predict(c, png_bytes(image)).json()["result_id"]).json()["feedback_id"]
               for image in fabric(3, 8, variant=True)]
        listed = {f["feedback_id"]: f for f in c.get("/v1/models/fabric/feedback").json()["feedback"]}
        bad = models_dir / "review" / listed[ids[1]]["image"]
        bad.write_bytes(bad.read_bytes()[:100])  # damaged on disk after it was stored
        r = c.post("/v1/models/fabric/apply-update", headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [item["feedback_id"] for item in body["left_out"]] == [ids[1]]
        assert bad.name in body["left_out"][0]["reason"]
        assert sorted(item["feedback_id"] for item in body["rescored"]) == [ids[0], ids[2]]
        statuses = {f["feedback_id"]: f["status"] for f in c.get("/v1/models/fabric/feedback").json()["feedback"]}
        assert statuses == {ids[0]: "applied", ids[1]: "left_out", ids[2]: "applied"}
        # every pending image unusable: 422 naming them, and the next update is not blocked by them
        only = feedback(c, predict(c, png_bytes(fabric(1, 9, variant=True)[0])).json()["result_id"]).json()
        listed = {f["feedback_id"]: f for f in c.get("/v1/models/fabric/feedback").json()["feedback"]}
        (models_dir / "review" / listed[only["feedback_id"]]["image"]).write_bytes(b"junk")
        r = c.post("/v1/models/fabric/apply-update", headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"]["left_out"][0]["feedback_id"] == only["feedback_id"]
        assert c.post("/v1/models/fabric/apply-update", headers=AUTH).status_code == 409  # nothing pending
        fresh = feedback(c, predict(c, png_bytes(fabric(1, 10, variant=True)[0])).json()["result_id"])
        assert fresh.status_code == 201
        assert c.post("/v1/models/fabric/apply-update", headers=AUTH).status_code == 200


# ---------------------------------------------------------------------------- the served file on disk
def test_a_served_model_file_replaced_in_place_changes_nothing_until_a_reload(models_dir, tmp_path):
    """Case: `cp other.model served.model` while served: SIGBUS or silently changed scores (mmap)."""
    config = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, coreset_ratio=0.6, batch_size=4)
    other = tmp_path / "other.model"
    PatchCore(config, device="cpu").fit(fabric(12, 11, variant=True)).save(other)
    image = png_bytes(fabric(1, 12)[0])
    with TestClient(create_app(settings_for(models_dir))) as c:
        before = predict(c, image).json()["score"]
        served = models_dir / "fabric.model"
        with open(served, "r+b") as handle:  # what cp does to an existing file: same inode, new bytes
            handle.write(other.read_bytes())
            handle.truncate()
        assert predict(c, image).json()["score"] == before
        with open(served, "r+b") as handle:
            handle.truncate(100)  # cut short under the served model: no SIGBUS, same answers
        assert predict(c, image).json()["score"] == before
        assert c.post("/v1/models/fabric/reload", headers=AUTH).status_code == 422  # a damaged file: refused
        assert predict(c, image).json()["score"] == before  # still the loaded model
        served.write_bytes(other.read_bytes())
        assert c.post("/v1/models/fabric/reload", headers=AUTH).status_code == 200
        assert predict(c, image).json()["score"] != before


def test_serve_stops_cleanly_on_sigterm(models_dir, tmp_path):
    """Must hold 3 for serve: SIGTERM is a graceful shutdown (uvicorn's), not a kill mid-request."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "token.txt").write_text(TOKEN)
    server = subprocess.Popen([sys.executable, "-m", "patchcore.app.cli", "serve", str(models_dir), "--port",
                               str(port), "--token-file", str(tmp_path / "token.txt"), "--device", "cpu",
                               "--log-level", "info"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/fabric/predict",
                       files={"file": ("x.png", png_bytes(fabric(1, 13)[0]), "image/png")}, timeout=60)
        assert r.status_code == 200
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert "Application shutdown complete" in err, err[-2000:]
    assert "Traceback" not in err
    assert server.returncode in (0, -signal.SIGTERM)


def test_a_named_pipe_as_token_file_is_refused_not_waited_on(tmp_path):
    """Other case tried (point 7): `--token-file` a named pipe hung `serve` at start-up."""
    import os

    from patchcore.app.server.settings import read_token

    pipe = tmp_path / "token"
    os.mkfifo(pipe)
    with pytest.raises(InputError, match="not a regular file"):
        read_token(pipe)


def test_apply_update_through_a_symlinked_model_keeps_the_real_previous_file(small_model, tmp_path):
    """Case: update through a symlink (apply-update): the kept .prev was a link to the new model."""
    store = tmp_path / "store"
    store.mkdir()
    small_model.save(store / "v1.model")
    original = (store / "v1.model").read_bytes()
    models = tmp_path / "models"
    models.mkdir()
    (models / "fabric.model").symlink_to(store / "v1.model")
    with TestClient(create_app(settings_for(models))) as c:
        for image in fabric(2, 14, variant=True):
            assert feedback(c, predict(c, png_bytes(image)).json()["result_id"]).status_code == 201
        body = c.post("/v1/models/fabric/apply-update", headers=AUTH).json()
        kept = store / body["previous_file"]
        assert kept.is_file() and not kept.is_symlink() and kept.read_bytes() == original
        assert (models / "fabric.model").is_symlink() and (store / "v1.model").read_bytes() != original
        assert c.get("/v1/models/fabric").json()["previous_versions"] == [kept.name]


def test_a_json_body_holding_nan_is_a_422_not_a_500(models_dir):
    """FastAPI's validation answer echoes the input, which cannot hold NaN as JSON: any such body was a 500."""
    with TestClient(create_app(settings_for(models_dir))) as client:
        headers = {**AUTH, "Content-Type": "application/json"}
        bodies = {"apply-update": '{"max_new": NaN}', "feedback": '{"result_id": NaN, "verdict": "good"}'}
        for route, body in bodies.items():
            answer = client.post(f"/v1/models/fabric/{route}", content=body, headers=headers)
            assert answer.status_code == 422, (route, answer.status_code, answer.text)
            assert "NaN" not in answer.text
