"""The torch-free runtime (patchcore.runtime) against the library: same scores, maps, labels and failures.

One small model (resnet18_random: the export takes seconds; efficientnet_lite0's dynamic-size export takes
minutes) fitted once, exported once. Parity bounds are issue 17's: image scores 1e-4 relative, maps 1e-3
(relative to the map's maximum), labels identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from child import NO_TORCH
from PIL import Image

from patchcore import PatchCore, PatchCoreConfig
from patchcore.errors import ImageReadError, InputError, ModelFileError
from patchcore.estimator.export import export_model
from patchcore.io.images import read_image
from patchcore.runtime import Runtime

SCORE_RTOL, MAP_RTOL = 1e-4, 1e-3


def _config(**overrides) -> PatchCoreConfig:
    values = dict(backbone="resnet18_random", resize=128, crop=None, coreset_ratio=0.1, batch_size=4, seed=0,
                  embedding_dim=256)
    values.update(overrides)
    return PatchCoreConfig(**values)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, category):
    """(model, model path, export folder) for a dynamic-size model (int resize, no crop)."""
    folder = tmp_path_factory.mktemp("runtime")
    train = sorted((category / "train" / "good").glob("*.png"))
    model = PatchCore(_config(), device="cpu").fit(train)
    path = folder / "fabric.model"
    model.save(path)
    export_model(model, path, folder / "fabric.onnx")
    return model, path, folder / "fabric.onnx"


def _test_images(category) -> list[Path]:
    return sorted((category / "test").rglob("*.png"))


def assert_parity(ours, ref) -> None:
    ref_scores = ref.scores.numpy()
    np.testing.assert_allclose(ours.scores, ref_scores, rtol=SCORE_RTOL, atol=0)
    ref_maps = ref.maps if isinstance(ref.maps, list) else list(ref.maps)
    our_maps = ours.maps if isinstance(ours.maps, list) else list(ours.maps)
    assert len(our_maps) == len(ref_maps)
    for a, b in zip(our_maps, ref_maps):
        b = b.numpy()
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) <= MAP_RTOL * float(np.abs(b).max())
    if ref.labels is None:
        assert ours.labels is None
    else:
        np.testing.assert_array_equal(ours.labels, ref.labels.numpy())


def test_runtime_scores_as_the_library(exported, category):
    model, path, export = exported
    runtime = Runtime.load(path, export)
    files = _test_images(category)
    ours, ref = runtime.predict(files), model.predict(files)
    assert ours.scores.shape == (len(files),) and ours.maps.shape == (len(files), 128, 128)
    assert_parity(ours, ref)
    assert ours.labels.any() and not ours.labels.all()  # the thresholds decide something here
    # masks at the calibrated pixel threshold, as the library's
    np.testing.assert_array_equal(ours.masks.mean((1, 2)) > 0, ref.masks.numpy().mean((1, 2)) > 0)


def test_images_of_other_sizes_get_their_own_maps(exported, category, tmp_path):
    """Dynamic H and W: an image of another aspect gets another model input and map size, as in the library."""
    model, path, export = exported
    runtime = Runtime.load(path, export)
    base = np.asarray(Image.open(_test_images(category)[0]).convert("RGB"))
    wide = np.ascontiguousarray(np.concatenate([base, base[:, :64]], axis=1))  # 128 x 192
    tall = np.ascontiguousarray(np.concatenate([base, base[:40]], axis=0))  # 168 x 128
    ours = runtime.predict([base, wide, tall])
    assert [m.shape for m in ours.maps] == [(128, 128), (128, 192), (168, 128)]
    ref = model.predict([base, wide, tall])
    assert_parity(ours, ref)
    # The same images as files (decoded ahead in threads, batch by batch): the same results, in input order.
    files = []
    for name, image in (("tall", tall), ("base", base), ("wide", wide)):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(image).save(files[-1])
    from_files = runtime.predict(files)
    assert [m.shape for m in from_files.maps] == [(168, 128), (128, 128), (128, 192)]
    np.testing.assert_allclose(from_files.scores, ours.scores[[2, 0, 1]], rtol=1e-6)


def test_exact_search_matches_a_brute_force_oracle(exported, category):
    """The runtime's 1-NN (the library's pruned BankIndex, on numpy) is exact: against a float64 oracle."""
    model, path, export = exported
    runtime = Runtime.load(path, export)
    x = runtime.preprocess([np.asarray(Image.open(f).convert("RGB")) for f in _test_images(category)[:3]])
    features = runtime.embed(x).reshape(-1, runtime.state_.memory_bank.shape[1]).astype(np.float64)
    bank = np.asarray(runtime.state_.memory_bank, dtype=np.float64)
    dist, idx = runtime.search(features.astype(np.float32))  # the library's BankIndex, on numpy
    dist, idx = dist[:, None], idx[:, None]
    oracle = np.sqrt(((features[:, None, :] - bank[None]) ** 2).sum(-1))
    # float32 GEMM ranking: the true nearest up to near-ties (the chosen row within 1e-4 of the true minimum)
    np.testing.assert_allclose(dist[:, 0], oracle.min(1), rtol=1e-4)
    chosen = oracle[np.arange(len(idx)), idx[:, 0]]
    np.testing.assert_allclose(chosen, oracle.min(1), rtol=1e-4)
    assert (idx[:, 0] == oracle.argmin(1)).mean() > 0.99


def test_runtime_imports_no_torch(exported, category, tmp_path):
    """The runtime in a process where `import torch` fails: it loads, scores files and reports bad ones."""
    model, path, export = exported
    files = _test_images(category)[:5]
    broken = tmp_path / "broken.png"
    broken.write_bytes(files[0].read_bytes()[:300])
    script = NO_TORCH + textwrap.dedent(f"""
        import json
        from patchcore.runtime import Runtime
        runtime = Runtime.load({str(path)!r}, {str(export)!r})
        scores, failures = [], []
        for batch in runtime.iter_predict({[str(f) for f in files] + [str(broken)]!r}):
            failures += [str(f) for f in batch.failures]
            if batch.result is not None:
                scores += batch.result.scores.tolist()
        from patchcore.app.score_cli import main
        code = main([{str(path)!r}, *{[str(f) for f in files[:2]] + [str(broken)]!r}, "--export", {str(export)!r},
                     "-o", {str(tmp_path / "scores.csv")!r}])
        print(json.dumps({{"scores": scores, "failures": failures, "cli_exit": code,
                           "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] == []
    np.testing.assert_allclose(out["scores"], model.predict(files).scores.numpy(), rtol=SCORE_RTOL)
    assert len(out["failures"]) == 1 and "broken.png" in out["failures"][0]
    # patchcore-score, the runtime-only command: two rows, the broken file named, exit 1
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert out["cli_exit"] == 1 and len(rows) == 3 and rows[0].startswith("file,score,label")
    assert float(rows[1].split(",")[1]) == pytest.approx(out["scores"][0], rel=1e-5)
    assert "broken.png" in done.stderr


def test_bad_inputs_are_per_file_failures(exported, category, tmp_path, monkeypatch):
    model, path, export = exported
    runtime = Runtime.load(path, export)
    good = _test_images(category)[0]
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (400, 300)).save(huge)
    monkeypatch.setenv("PATCHCORE_MAX_PIXELS", str(300 * 300))
    batches = list(runtime.iter_predict([good, text, huge, good]))
    failures = [str(f) for b in batches for f in b.failures]
    assert len(failures) == 2
    assert any("notes.png" in f and "not an image" in f for f in failures)
    assert any("huge.png" in f and "MAX_PIXELS" in f for f in failures)
    assert sum(len(b.paths) for b in batches) == 2
    other = tmp_path / "other.png"  # another size than the model input: a batch holds the model input only
    Image.open(good).convert("RGB").resize((192, 160)).save(other)
    (batch,) = list(runtime.iter_predict([other]))
    assert batch.images[0].shape[:2] == batch.result.maps[0].shape != (160, 192)
    assert batch.images[0].tobytes() == runtime.model_input(read_image(other)).tobytes()
    with pytest.raises(ImageReadError, match="notes.png"):
        runtime.predict([good, text])
    with pytest.raises(InputError, match="uint8"):
        runtime.predict(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(InputError, match="empty"):
        runtime.predict(np.zeros((0, 32, 3), dtype=np.uint8))


def test_an_update_needs_no_re_export(exported, category, tmp_path):
    """The bank lives in the model file: after `update` the old graph scores the new bank, as the library."""
    model, path, export = exported
    updated = PatchCore.load(path, device="cpu")
    updated.update(sorted((category / "test" / "good").glob("*.png"))[:3], max_new=50)
    assert updated.memory_bank_.shape[0] > model.memory_bank_.shape[0]
    new_path = tmp_path / "fabric.model"
    updated.save(new_path)
    runtime = Runtime.load(new_path, export)
    files = _test_images(category)
    assert_parity(runtime.predict(files), updated.predict(files))


def test_exports_for_other_weights_or_changed_graphs_are_refused(exported, category, tmp_path):
    model, path, export = exported
    other = PatchCore(_config(seed=1), device="cpu").fit(sorted((category / "train" / "good").glob("*.png"))[:8])
    other_path = tmp_path / "other.model"
    other.save(other_path)
    with pytest.raises(ModelFileError, match="other backbone weights"):
        Runtime.load(other_path, export)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("export.json", "embedding.onnx"):
        (tampered / name).write_bytes((export / name).read_bytes())
    with open(tampered / "embedding.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelFileError, match="sha256"):
        Runtime.load(path, tampered)
    (tampered / "export.json").write_text("{")
    with pytest.raises(ModelFileError, match="not a readable export manifest"):
        Runtime.load(path, tampered)
    with pytest.raises(ModelFileError, match="no export manifest"):
        Runtime.load(path, tmp_path / "nowhere")


def test_a_damaged_model_file_is_refused_without_torch_types(exported, tmp_path):
    """The runtime reads the model file through the library's schema (io/fitted_state.py): a NaN bank is a
    ModelFileError naming the field, as PatchCore.load gives."""
    from safetensors.numpy import load_file, save_file

    model, path, export = exported
    from patchcore.io.model_file import read_model_file
    _, header = read_model_file(path)
    tensors = load_file(str(path))
    tensors["memory_bank"][0, 0] = np.nan
    bad = tmp_path / "nan.model"
    save_file(tensors, str(bad), metadata={"patchcore": json.dumps(header)})
    with pytest.raises(ModelFileError, match="memory_bank"):
        Runtime.load(bad, export)
    with pytest.raises(ModelFileError, match="memory_bank"):
        PatchCore.load(bad, device="cpu")


def test_fixed_geometry_exports_a_static_graph(category, tmp_path):
    """The MVTec protocol (resize, then a centre crop) fixes the model input: a static H, W graph; images of
    other sizes still work (they are resized and cropped to it first)."""
    train = sorted((category / "train" / "good").glob("*.png"))[:10]
    model = PatchCore(_config(resize=128, crop=96, calibration_ratio=0.0), device="cpu").fit(train)
    path = tmp_path / "crop.model"
    model.save(path)
    report = export_model(model, path, tmp_path / "crop.onnx")
    assert not report.dynamic_size and report.max_score_rel_diff <= SCORE_RTOL
    manifest = json.loads((tmp_path / "crop.onnx" / "export.json").read_text())
    assert manifest["input_size"] == [96, 96]
    runtime = Runtime.load(path, tmp_path / "crop.onnx")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in _test_images(category)[:3]]
    images.append(np.ascontiguousarray(np.concatenate([images[0], images[1]], axis=1)))  # 128 x 256
    for image in images:
        ours = runtime.predict(image)
        ref = model.predict(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None])
        assert_parity(ours, ref)


def test_cli_export_then_predict_with_the_onnx_runtime(exported, category, tmp_path, capsys):
    """`patchcore export` then `patchcore predict --runtime onnx`: the same scores.csv rows (scores within the
    parity bound, identical labels) and the same output files as the torch runtime."""
    import csv
    import shutil

    from patchcore.app.cli import main

    path = tmp_path / "fabric.model"
    shutil.copyfile(exported[1], path)
    assert main(["export", str(path), "--check-images", str(category / "test" / "hole")]) == 0
    assert "labels identical" in capsys.readouterr().err
    assert (tmp_path / "fabric.model.onnx" / "export.json").is_file()  # the default folder, MODEL.onnx
    rows = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        code = main(["predict", str(path), str(category / "test" / "good"), str(category / "test" / "hole"),
                     "-o", str(out), "--quiet", "--runtime", runtime])
        assert code == 0
        rows[runtime] = {row["name"]: row for row in csv.DictReader(open(out / "scores.csv"))}
        assert len(list((out / "heatmaps").glob("*.png"))) == len(rows[runtime]) == 10
    for name, row in rows["torch"].items():
        other = rows["onnx"][name]
        assert float(other["score"]) == pytest.approx(float(row["score"]), rel=SCORE_RTOL)
        assert other["label"] == row["label"]


def test_openvino_backend_is_fp32_unless_asked(exported, category):
    """OpenVINO (extra 'openvino'): forced to fp32, it scores as the library; bf16 is an explicit option."""
    pytest.importorskip("openvino")
    model, path, export = exported
    files = _test_images(category)[:6]
    runtime = Runtime.load(path, export, backend="openvino")
    assert runtime.session.precision == "fp32"
    assert_parity(runtime.predict(files), model.predict(files))
    from patchcore.errors import ConfigError
    with pytest.raises(ConfigError, match="OpenVINO option"):
        Runtime.load(path, export, backend="onnxruntime", precision="bf16")
