"""HTTP API (app/server): scoring, limits, refusals, auth, batching, back-pressure, review and live update."""
from __future__ import annotations

import base64
import contextlib
import io
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import uvicorn
from fastapi.testclient import TestClient

from patchcore.app.server.api import create_app
from patchcore.app.server.settings import ServerSettings, read_token
from patchcore.evaluation.synthetic import fabric_texture

TOKEN = "t0ken-for-tests-0123456789"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def variant_images(n: int, seed: int = 11) -> list[bytes]:
    """Good images of a colour the model has not seen: false alarms until an update."""
    rng = np.random.default_rng(seed)
    return [png_bytes(np.ascontiguousarray(fabric_texture(rng, 128)[..., [2, 0, 1]])) for _ in range(n)]


def make_settings(models_dir: Path, **changes) -> ServerSettings:
    values = dict(models_dir=models_dir, review_dir=models_dir / "review", token=TOKEN, device="cpu",
                  max_wait_ms=5.0)
    values.update(changes)
    return ServerSettings(**values)


@pytest.fixture()
def client(models_dir):
    with TestClient(create_app(make_settings(models_dir))) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(settings: ServerSettings, timeout: float = 60.0):
    """uvicorn on 127.0.0.1 and a free port, in a thread; yields the base URL; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("test server did not become ready")
        time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def predict(c, data: bytes, query: str = "", name: str = "x.png", kind: str = "image/png", **kw):
    return c.post(f"/v1/models/fabric/predict{query}", files={"file": (name, data, kind)}, **kw)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------------- reading
def test_health_models_metadata_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["fabric"] and models[0]["version"] == 1
    info = client.get("/v1/models/fabric").json()
    assert info["config"]["backbone"] == "efficientnet_lite0" and info["bank_rows"] > 0
    assert client.get("/v1/models/nope").status_code == 404
    schema = client.get("/openapi.json").json()
    assert {"/v1/models/{name}/predict", "/v1/models/{name}/feedback", "/v1/models/{name}/apply-update",
            "/metrics", "/healthz", "/readyz"} <= set(schema["paths"])


def test_predict_matches_the_library_and_returns_pictures_on_request(client, fitted, category):
    path = sorted((category / "test" / "hole").glob("*.png"))[0]
    body = predict(client, path.read_bytes(), "?overlay=1&heatmap=1&map=1").json()
    expected = fitted.predict([path])
    assert body["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5)
    assert body["label"] == "defect" and body["threshold"] == pytest.approx(fitted.image_threshold_)
    assert set(body["timing_ms"]) == {"decode", "queue", "compute", "total"}
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert overlay.size == heatmap.size == (128, 128)
    assert np.allclose(np.array(body["map"]), expected.maps[0].numpy(), atol=1e-3)
    plain = predict(client, path.read_bytes()).json()
    assert plain["overlay_png"] is None and plain["map"] is None


def test_bad_uploads_get_clear_refusals_and_the_server_keeps_serving(models_dir, category):
    good = sorted((category / "test" / "good").glob("*.png"))[0].read_bytes()
    settings = make_settings(models_dir, max_upload_bytes=200_000, max_pixels=300 * 300)
    with TestClient(create_app(settings)) as c:
        r = predict(c, b"hello", name="a.txt", kind="text/plain")
        assert r.status_code == 415 and "expected an image" in r.json()["detail"]
        assert predict(c, b"not an image at all").status_code == 415
        assert predict(c, good[:60]).status_code == 422  # a PNG cut short
        assert predict(c, b"").status_code == 422
        big = png_bytes(np.zeros((400, 400, 3), np.uint8))
        r = predict(c, big)
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
        noise = png_bytes(np.random.default_rng(0).integers(0, 255, (290, 290, 3), dtype=np.uint8))
        assert len(noise) > 200_000 and predict(c, noise).status_code == 413
        assert c.post("/v1/models/fabric/predict").status_code == 422  # no file field
        assert predict(c, good).status_code == 200  # still serving
        metrics = c.get("/metrics").text
        assert 'patchcore_rejected_total{reason="bad_image"}' in metrics


# ---------------------------------------------------------------------------- auth
def test_state_changing_endpoints_refuse_without_the_right_token(client, category):
    result_id = predict(client, sorted((category / "test" / "good").glob("*.png"))[0].read_bytes()).json()["result_id"]
    body = {"result_id": result_id, "verdict": "good"}
    for path, kw in (("feedback", {"json": body}), ("apply-update", {}), ("reload", {})):
        url = f"/v1/models/fabric/{path}"
        missing = client.post(url, **kw)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert client.post(url, headers={"Authorization": "Bearer wrong-token-000000000"}, **kw).status_code == 403
        assert client.post(url, headers={"Authorization": f"Basic {TOKEN}"}, **kw).status_code == 401
    assert client.post("/v1/models/fabric/feedback", json=body, headers=AUTH).status_code == 201


def test_without_a_configured_token_state_changes_are_disabled(models_dir):
    with TestClient(create_app(make_settings(models_dir, token=None))) as c:
        r = c.post("/v1/models/fabric/reload", headers=AUTH)
        assert r.status_code == 403 and "without a token" in r.json()["detail"]


def test_off_loopback_predict_needs_the_token_unless_opened(models_dir, category):
    data = sorted((category / "test" / "good").glob("*.png"))[0].read_bytes()
    with TestClient(create_app(make_settings(models_dir, host="0.0.0.0"))) as c:
        assert predict(c, data).status_code == 401
        assert predict(c, data, headers={"Authorization": "Bearer wrong-token-000000000"}).status_code == 403
        assert predict(c, data, headers=AUTH).status_code == 200
    with TestClient(create_app(make_settings(models_dir, host="0.0.0.0", open_predict=True))) as c:
        assert predict(c, data).status_code == 200
        assert c.post("/v1/models/fabric/reload").status_code == 401  # still closed


def test_token_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert read_token(tmp_path / "token") == TOKEN
    (tmp_path / "short").write_text("abc")
    with pytest.raises(Exception, match="16 characters"):
        read_token(tmp_path / "short")
    monkeypatch.setenv("PATCHCORE_TOKEN", TOKEN)
    assert read_token(None) == TOKEN


# ---------------------------------------------------------------------------- batching and back-pressure
def test_concurrent_requests_are_batched_and_a_full_queue_answers_503_then_recovers(models_dir, category):
    data = sorted((category / "test" / "good").glob("*.png"))[0].read_bytes()
    settings = make_settings(models_dir, max_batch=8, max_wait_ms=150.0, max_queue=4)

    def post(url):
        return httpx.post(url + "/v1/models/fabric/predict", files={"file": ("x.png", data, "image/png")}, timeout=60)

    with live_server(settings) as url, ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: post(url), range(12)))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
        busy = next(r for r in replies if r.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1
        assert max(r.json()["batch_size"] for r in replies if r.status_code == 200) > 1
        time.sleep(0.5)
        again = list(pool.map(lambda _: post(url), range(4)))  # within the limit: all served
        assert [r.status_code for r in again] == [200] * 4
        metrics = httpx.get(url + "/metrics").text
        assert 'patchcore_rejected_total{reason="queue_full"}' in metrics
        assert "patchcore_batch_size_bucket" in metrics and "patchcore_queue_depth 0.0" in metrics


# ---------------------------------------------------------------------------- review and live update
def test_feedback_then_apply_update_swaps_the_model_without_dropping_requests(models_dir, category):
    false_alarms = variant_images(4)
    good = sorted((category / "test" / "good").glob("*.png"))[0].read_bytes()
    settings = make_settings(models_dir)
    with live_server(settings) as url:
        c = httpx.Client(base_url=url, timeout=60)
        scored = [predict(c, d, name="../../etc/passwd.png").json() for d in false_alarms]
        assert all(s["label"] == "defect" for s in scored)
        assert c.post("/v1/models/fabric/apply-update", headers=AUTH).status_code == 409  # nothing accepted yet
        for s in scored[:3]:
            r = c.post("/v1/models/fabric/feedback", json={"result_id": s["result_id"], "verdict": "good"},
                       headers=AUTH)
            assert r.status_code == 201
            assert r.json()["stored_as"].startswith("images/") and "passwd" not in r.json()["stored_as"]
        r = c.post("/v1/models/fabric/feedback", json={"result_id": "0" * 32, "verdict": "good"}, headers=AUTH)
        assert r.status_code == 404

        stop, codes = threading.Event(), []

        def keep_predicting():
            with httpx.Client(base_url=url, timeout=60) as mine:
                while not stop.is_set() and len(codes) < 200:
                    codes.append(predict(mine, good).status_code)

        worker = threading.Thread(target=keep_predicting)
        worker.start()
        update = c.post("/v1/models/fabric/apply-update", headers=AUTH, json={"max_new": None})
        time.sleep(0.3)
        stop.set()
        worker.join(timeout=60)
        assert update.status_code == 200, update.text
        body = update.json()
        assert body["model_version"] == 2 and body["bank_rows_after"] > body["bank_rows_before"]
        assert body["stopped_by"] == "radius" and body["previous_file"].endswith(".prev")
        assert all(r["label_after"] == "good" and r["score_after"] < r["score_before"] for r in body["rescored"])
        assert codes and set(codes) == {200}  # no request dropped during the swap
        held_out = predict(c, false_alarms[3]).json()
        assert held_out["model_version"] == 2 and held_out["score"] < scored[3]["score"]
        assert (models_dir / body["previous_file"]).is_file()
        assert c.post("/v1/models/fabric/apply-update", headers=AUTH).status_code == 409  # all applied
        assert 'patchcore_model_version{model="fabric"} 2.0' in c.get("/metrics").text
        info = c.get("/v1/models/fabric").json()
        assert info["feedback"] == {"good_pending": 0, "good_applied": 3, "defect": 0, "left_out": 0}
        reloaded = c.post("/v1/models/fabric/reload", headers=AUTH).json()  # the saved file is the updated model
        assert reloaded["version"] == 3 and reloaded["bank_rows"] == body["bank_rows_after"]
    db = sqlite3.connect(settings.review_dir / "review.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    files = [row[0] for row in db.execute("SELECT image_file FROM feedback")]
    assert len(files) == 3 and all((settings.review_dir / f).is_file() for f in files)


def test_a_tiled_model_with_a_region_is_served_like_the_library(train_paths, category, tmp_path):
    """High-resolution settings travel in the model file: the server scores a tiled, region-masked model
    exactly as the library does."""
    from patchcore import PatchCore, PatchCoreConfig

    mask = np.zeros((128, 128), np.uint8)
    mask[:, :96] = 255
    Image.fromarray(mask).save(tmp_path / "region.png")
    config = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None, tile_size=64, tile_overlap=32,
                             region=str(tmp_path / "region.png"), coreset_ratio=0.2, calibration_ratio=0.0)
    model = PatchCore(config, device="cpu").fit(train_paths[:4])
    folder = tmp_path / "models"
    folder.mkdir()
    model.save(folder / "tiled.model")
    path = sorted((category / "test" / "stain").glob("*.png"))[0]
    with TestClient(create_app(make_settings(folder))) as c:
        body = c.post("/v1/models/tiled/predict", files={"file": ("a.png", path.read_bytes(), "image/png")},
                      params={"map": 1}).json()
    expected = model.predict(path)
    assert body["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5)
    served_map = np.array(body["map"])
    assert np.allclose(served_map, expected.maps[0].numpy(), atol=1e-3) and (served_map[:, 96:] == 0).all()
