"""The server suite again, every model scored through its export (`patchcore serve --runtime onnx`): every
server behaviour (batching, limits, tokens, feedback, apply-update, reload) must hold on both runtimes."""
from __future__ import annotations

import shutil

import pytest
import test_server
from test_server import *  # noqa: F403 (the suite, collected again here with the fixture below)

from patchcore.estimator.export import export_model
from patchcore.estimator.exported import ExportedPatchCore, default_export_dir
from patchcore.estimator.model import PatchCore


@pytest.fixture(scope="session")
def fitted_export(fitted, tmp_path_factory):
    """The session model's export, made once: a static-size graph (seconds, against minutes for the dynamic
    export of TF-padded EfficientNet-Lite0; the suite's uploads are all of the training size)."""
    path = tmp_path_factory.mktemp("served") / "fabric.model"
    fitted.save(path)
    export_model(fitted, path, default_export_dir(path), static_size=True)
    return default_export_dir(path)


@pytest.fixture(autouse=True)
def onnx_runtime(monkeypatch, fitted, fitted_export):
    """Every server of the suite runs with runtime "onnx", and every model a test saves gets its export
    beside it (a copy of the session's for the session's model)."""
    settings = test_server.make_settings
    monkeypatch.setattr(test_server, "make_settings",
                        lambda models_dir, **changes: settings(models_dir, **{"runtime": "onnx", **changes}))
    save = PatchCore.save

    def save_and_export(self, path):
        save(self, path)
        target = default_export_dir(path)
        if target.exists() or isinstance(self, ExportedPatchCore):  # an update: the export stays valid
            return
        if self is fitted:
            shutil.copytree(fitted_export, target)
        else:
            export_model(self, path, target, static_size=self.config.tile_size is None)

    monkeypatch.setattr(PatchCore, "save", save_and_export)


def test_the_served_models_score_through_the_export(models_dir):
    from fastapi.testclient import TestClient

    from patchcore.app.server.api import create_app

    with TestClient(create_app(test_server.make_settings(models_dir))) as client:
        assert client.get("/healthz").status_code == 200
        entry = client.app.state.services.registry.get("fabric")
        assert isinstance(entry.model, ExportedPatchCore)
