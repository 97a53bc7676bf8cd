"""The model file: safetensors + JSON header, atomic writes, clear errors, no pickle."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

import patchcore.io.model_file as model_file
from patchcore.errors import ModelFileError
from patchcore.io.model_file import FORMAT_NAME, FORMAT_VERSION, read_model_file, write_model_file


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "memory_bank": torch.randn(37, 11, generator=gen),
        "half": torch.randn(4, 3, generator=gen).half(),
        "bf16": torch.randn(5, generator=gen).bfloat16(),
        "indices": torch.randint(0, 1 << 40, (9,), generator=gen),
        "mask": torch.rand(6, generator=gen) > 0.5,
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
        "scalar": torch.tensor(3.5),
        "strided": torch.randn(6, 8, generator=gen)[:, ::2],  # non-contiguous input
    }


METADATA = {"config": {"backbone": "resnet18", "feature_strides": [8, 16], "crop": None},
            "package_version": "0.1.0", "threshold": 1.25, "notes": "ünïcode ✓"}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def test_round_trip_is_bitwise(tmp_path):
    path = tmp_path / "sub" / "m.patchcore"  # the folder is created
    tensors = _tensors()
    write_model_file(path, tensors, METADATA)
    loaded, header = read_model_file(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert _bitwise_equal(loaded[key], value), key
    assert header == {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **METADATA}


def test_same_inputs_same_bytes(tmp_path):
    write_model_file(tmp_path / "a", _tensors(), METADATA)
    write_model_file(tmp_path / "b", _tensors(), dict(reversed(list(METADATA.items()))))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_file_is_safetensors_not_pickle(tmp_path):
    path = tmp_path / "m.patchcore"
    tensors = _tensors()
    write_model_file(path, tensors, METADATA)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])  # 8-byte little-endian header length
    assert 8 + length <= len(raw)
    header = json.loads(raw[8:8 + length])  # then a plain JSON header
    assert raw[8:9] == b"{"
    assert json.loads(header["__metadata__"]["patchcore"])["format"] == FORMAT_NAME
    assert not raw.startswith(b"\x80")  # no pickle protocol marker
    with safe_open(str(path), framework="pt") as handle:  # no pickle involved in reading it back
        assert set(handle.keys()) == set(tensors)
        assert json.loads(handle.metadata()["patchcore"])["config"] == METADATA["config"]
        for key in tensors:
            assert _bitwise_equal(handle.get_tensor(key), tensors[key])


def test_overwrite_replaces_the_previous_file(tmp_path):
    path = tmp_path / "m.patchcore"
    write_model_file(path, _tensors(0), METADATA)
    write_model_file(path, _tensors(1), {"threshold": 2.0})
    loaded, header = read_model_file(path)
    assert _bitwise_equal(loaded["memory_bank"], _tensors(1)["memory_bank"])
    assert header["threshold"] == 2.0
    assert sorted(os.listdir(tmp_path)) == ["m.patchcore"]


@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "m.patchcore"
    write_model_file(path, _tensors(0), METADATA)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if failing == "replace":
        monkeypatch.setattr(model_file.os, "replace", boom)
    elif failing == "fsync":
        monkeypatch.setattr(model_file.os, "fsync", boom)
    else:  # the payload write itself fails half-way: the temp file holds partial bytes when it raises
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                self.handle.write(data[: len(data) // 2])
                self.handle.flush()
                raise OSError("disk full (simulated)")

        monkeypatch.setattr(model_file.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))

    with pytest.raises(OSError, match="simulated"):
        write_model_file(path, _tensors(1), {"threshold": 9.0})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.patchcore"]  # no temporary file left behind
    loaded, header = read_model_file(path)
    assert _bitwise_equal(loaded["memory_bank"], _tensors(0)["memory_bank"])
    assert header["threshold"] == METADATA["threshold"]


def _write_raw(path, header: dict | None, tensors=None) -> None:
    metadata = None if header is None else {"patchcore": json.dumps(header)}
    path.write_bytes(save(tensors or {"x": torch.zeros(3)}, metadata=metadata))


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(tmp_path, version):
    path = tmp_path / "future.patchcore"
    _write_raw(path, {"format": FORMAT_NAME, "format_version": version, "package_version": "9.9.9"})
    with pytest.raises(ModelFileError) as info:
        read_model_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"version {version}" in message
    assert "9.9.9" in message  # says which release wrote it


def _png_bytes(tmp_path) -> bytes:
    png = tmp_path / "picture.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    return png.read_bytes()


@pytest.mark.parametrize("kind", ["random", "png", "empty", "text", "truncated", "short", "huge-length"])
def test_non_model_files_name_the_file(tmp_path, kind):
    good = tmp_path / "good.patchcore"
    write_model_file(good, _tensors(), METADATA)
    payload = {
        "random": np.random.default_rng(0).bytes(4096),
        "png": _png_bytes(tmp_path),
        "empty": b"",
        "text": b"backbone: resnet18\nthreshold: 1.0\n",
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "short": b"\x05\x00\x00",
        "huge-length": struct.pack("<Q", 10**6) + b"{}",
    }[kind]
    path = tmp_path / f"{kind}.patchcore"
    path.write_bytes(payload)
    with pytest.raises(ModelFileError, match="not a patchcore model file") as info:
        read_model_file(path)
    assert str(path) in str(info.value)


def test_safetensors_without_patchcore_metadata(tmp_path):
    plain = tmp_path / "weights.safetensors"
    _write_raw(plain, None)
    other = tmp_path / "other.safetensors"
    other.write_bytes(save({"x": torch.zeros(2)}, metadata={"format": "pt"}))
    for path in (plain, other):
        with pytest.raises(ModelFileError, match="without patchcore metadata") as info:
            read_model_file(path)
        assert str(path) in str(info.value)


def test_wrong_format_name(tmp_path):
    path = tmp_path / "x.safetensors"
    _write_raw(path, {"format": "something-else", "format_version": FORMAT_VERSION})
    with pytest.raises(ModelFileError, match="not a patchcore model file"):
        read_model_file(path)


def test_missing_file_and_folder(tmp_path):
    for path in (tmp_path / "nope.patchcore", tmp_path):
        with pytest.raises(ModelFileError, match="no such model file") as info:
            read_model_file(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("value", ["[1, 2]", "null"])
def test_patchcore_metadata_that_is_not_an_object(tmp_path, value):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(save({"x": torch.zeros(2)}, metadata={"patchcore": value}))
    with pytest.raises(ModelFileError):
        read_model_file(path)


# ---------------------------------------------------------------------------- writes: permissions, errors
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o000, 0o666)])
def test_written_files_get_the_umask_permissions_of_a_plain_file(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_model_file(tmp_path / "m.patchcore", _tensors(), METADATA)  # new file
        write_model_file(tmp_path / "m.patchcore", _tensors(1), METADATA)  # replacing one
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(previous)
    assert (tmp_path / "m.patchcore").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain").stat().st_mode & 0o777 == mode  # what open() gives


def test_umask_is_read_without_changing_it():
    previous = os.umask(0o027)
    try:
        assert model_file.current_umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)


def test_a_failed_write_is_an_output_error_naming_the_file(tmp_path, monkeypatch):
    from patchcore.errors import OutputError, PatchCoreError

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_file.os, "fsync", fsync)
    with pytest.raises(OutputError, match="No space left on device") as info:
        write_model_file(tmp_path / "m.patchcore", _tensors(), METADATA)
    assert isinstance(info.value, PatchCoreError) and str(tmp_path / "m.patchcore") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_a_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "m.patchcore"
    write_model_file(path, _tensors(0), METADATA)
    before = path.read_bytes()

    def fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_file.os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        write_model_file(path, _tensors(1), METADATA)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.patchcore"]


def test_writing_through_a_symlink_replaces_its_target(tmp_path):
    target = tmp_path / "v1.patchcore"
    write_model_file(target, _tensors(0), METADATA)
    (tmp_path / "current").symlink_to(target.name)
    write_model_file(tmp_path / "current", _tensors(1), METADATA)
    assert (tmp_path / "current").is_symlink()
    assert _bitwise_equal(read_model_file(target)[0]["memory_bank"], _tensors(1)["memory_bank"])


def test_check_output_file(tmp_path, monkeypatch):
    from patchcore.errors import OutputError
    from patchcore.io.model_file import check_output_file

    assert check_output_file(tmp_path / "a" / "b" / "m.model") == tmp_path / "a" / "b" / "m.model"
    assert not (tmp_path / "a").exists()  # nothing is created by the check
    assert list(tmp_path.iterdir()) == []  # and its probe file is gone
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_file(tmp_path / "f" / "m.model")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(OutputError, match="broken symbolic link"):
        check_output_file(tmp_path / "dangling" / "m.model")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(OutputError, match="not a regular file"):
            check_output_file(tmp_path / "fifo")

    def mkstemp(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_file.tempfile, "mkstemp", mkstemp)
    with pytest.raises(OutputError, match="cannot write here"):
        check_output_file(tmp_path / "m.model")


# ---------------------------------------------------------------------------- reads: header bounds
def _good_file(tmp_path):
    path = tmp_path / "good.patchcore"
    write_model_file(path, {"memory_bank": torch.randn(5, 3)}, METADATA)
    return path


def _with_header(path, tmp_path, edit) -> object:
    """Rewrite the safetensors header of `path` (same data bytes) after `edit(header_dict)`."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    out = tmp_path / "edited.patchcore"
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["memory_bank"].update(dtype="F99"), "unknown dtype"),
    (lambda h: h["memory_bank"].update(shape=[5, -3]), "bad shape"),
    (lambda h: h["memory_bank"].update(shape="5,3"), "bad shape"),
    (lambda h: h["memory_bank"].update(shape=[1] * 9), "bad shape"),
    (lambda h: h["memory_bank"].update(shape=[50, 3]), "data bytes for shape"),
    (lambda h: h["memory_bank"].update(data_offsets=[0, 10**9]), "outside the file"),
    (lambda h: h["memory_bank"].update(data_offsets=[8, 4]), "outside the file"),
    (lambda h: h["memory_bank"].update(data_offsets=[0]), "bad data offsets"),
    (lambda h: h["memory_bank"].pop("dtype"), "malformed"),
    (lambda h: h.update(other="x"), "malformed"),
    (lambda h: h["__metadata__"].update(x=1), "object of strings"),
])
def test_hostile_safetensors_headers_are_refused_before_reading_data(tmp_path, edit, match):
    path = _with_header(_good_file(tmp_path), tmp_path, edit)
    with pytest.raises(ModelFileError, match=match) as info:
        read_model_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000, b'{"a": 1, "a": 2}', b"[1, 2]", b"\xff\xfe"])
def test_header_json_that_is_nested_too_deep_duplicated_or_not_an_object(tmp_path, header):
    path = tmp_path / "x.patchcore"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelFileError, match="not a patchcore model file"):
        read_model_file(path)


def test_header_longer_than_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(model_file, "MAX_HEADER_BYTES", 64)
    with pytest.raises(ModelFileError, match="more than the 64 allowed"):
        read_model_file(_good_file(tmp_path))


def test_the_file_is_not_read_into_memory_whole(tmp_path, monkeypatch):
    from pathlib import Path

    path = _good_file(tmp_path)

    def read_bytes(self):
        raise AssertionError("read_bytes reads the whole file")

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    tensors, header = read_model_file(path)
    assert tensors["memory_bank"].shape == (5, 3) and header["notes"] == METADATA["notes"]


@pytest.mark.parametrize("tensors, match", [
    ({"memory_bank": torch.zeros(4, 3), "extra": torch.zeros(2)}, r"unexpected tensors \['extra'\]"),
    ({"bank": torch.zeros(4, 3)}, "'memory_bank' is missing"),
    ({"memory_bank": torch.zeros(4, 3, dtype=torch.float64)}, "must be 2-D F32, got 2-D F64"),
    ({"memory_bank": torch.zeros(4, 3).half()}, "must be 2-D F32, got 2-D F16"),
    ({"memory_bank": torch.zeros(12)}, "must be 2-D F32, got 1-D F32"),
])
def test_tensor_schema_is_checked_before_the_data_is_read(tmp_path, tensors, match):
    path = tmp_path / "m.patchcore"
    write_model_file(path, tensors, METADATA)
    with pytest.raises(ModelFileError, match=match) as info:
        read_model_file(path, tensor_schema={"memory_bank": ("F32", 2)})
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- load: the schema and its bounds
@pytest.fixture(scope="module")
def saved_model(train_paths, tmp_path_factory):
    from patchcore import PatchCore, PatchCoreConfig

    config = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, coreset_ratio=0.5, batch_size=4)
    path = tmp_path_factory.mktemp("schema") / "m.model"
    PatchCore(config, device="cpu").fit(train_paths[:12]).save(path)  # 12 images: thresholds are set
    return path


def _edited(saved_model, tmp_path, *, fitted=None, header=None, tensors=None):
    """A copy of the saved model with fields changed (a value of `...` deletes the field)."""
    loaded, head = read_model_file(saved_model)
    head = {k: v for k, v in head.items() if k not in ("format", "format_version")}
    for key, value in (fitted or {}).items():
        if value is ...:
            head["fitted"].pop(key)
        else:
            head["fitted"][key] = value
    for key, value in (header or {}).items():
        if value is ...:
            head.pop(key)
        else:
            head[key] = value
    if tensors is not None:
        loaded = tensors(loaded)
    path = tmp_path / "edited.model"
    write_model_file(path, loaded, head)
    return path


def _config_with(saved_model, **changes):
    config = dict(read_model_file(saved_model)[1]["config"])
    config.update(changes)
    return config


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("changes, field", [
    (dict(tensors=lambda t: {"memory_bank": torch.full_like(t["memory_bank"], NAN)}), "memory_bank"),
    (dict(tensors=lambda t: {"memory_bank": t["memory_bank"].index_fill(0, torch.tensor([3]), INF)}),
     "memory_bank"),
    (dict(tensors=lambda t: {"memory_bank": t["memory_bank"][:0]}), "memory_bank"),
    (dict(tensors=lambda t: {**t, "extra": torch.zeros(3)}), "tensors"),
    (dict(tensors=lambda t: {"memory_bank": t["memory_bank"].double()}), "memory_bank"),
    (dict(tensors=lambda t: {"memory_bank": t["memory_bank"].flatten()}), "memory_bank"),
    (dict(tensors=lambda t: {"other": t["memory_bank"]}), "memory_bank"),
    (dict(fitted={"distance_scale": 0.0}), "fitted.distance_scale"),
    (dict(fitted={"distance_scale": -1.0}), "fitted.distance_scale"),
    (dict(fitted={"distance_scale": NAN}), "fitted.distance_scale"),
    (dict(fitted={"distance_scale": INF}), "fitted.distance_scale"),
    (dict(fitted={"distance_scale": "1.0"}), "fitted.distance_scale"),
    (dict(fitted={"distance_scale": True}), "fitted.distance_scale"),
    (dict(fitted={"distance_scale": ...}), "fitted.distance_scale"),
    (dict(fitted={"image_threshold": NAN}), "fitted.image_threshold"),
    (dict(fitted={"pixel_threshold": -INF}), "fitted.pixel_threshold"),
    (dict(fitted={"image_threshold": [1]}), "fitted.image_threshold"),
    (dict(fitted={"calibration_scores": [1.0, NAN]}), "fitted.calibration_scores"),
    (dict(fitted={"calibration_scores": "1,2"}), "fitted.calibration_scores"),
    (dict(fitted={"grid": ...}), "fitted.grid"),
    (dict(fitted={"grid": [8]}), "fitted.grid"),
    (dict(fitted={"grid": [8, -8]}), "fitted.grid"),
    (dict(fitted={"grid": [0, 8]}), "fitted.grid"),
    (dict(fitted={"grid": [80, 8]}), "fitted.grid"),  # larger than the input
    (dict(fitted={"grid": [4, 8]}), "fitted.grid"),  # not what a stride of 8 gives on 64 x 64
    (dict(fitted={"input_size": [64, 0]}), "fitted.input_size"),
    (dict(fitted={"input_size": [1 << 20, 1 << 20]}), "fitted.input_size"),
    (dict(fitted={"input_size": [64.5, 64]}), "fitted.input_size"),
    (dict(fitted={"n_train_images": 0}), "fitted.n_train_images"),
    (dict(fitted={"n_train_images": ...}), "fitted.n_train_images"),
    (dict(fitted={"n_train_patches": 3}), "fitted.n_train_patches"),  # fewer than the bank's rows
    (dict(fitted={"n_train_patches": 10**9}), "fitted.n_train_patches"),
    (dict(header={"fitted": ...}), "fitted"),
    (dict(header={"fitted": [1, 2]}), "fitted"),
    (dict(header={"backbone_weights_sha256": ...}), "backbone_weights_sha256"),
    (dict(header={"backbone_weights_sha256": "abc"}), "backbone_weights_sha256"),
])
def test_invalid_fitted_state_is_one_model_file_error_naming_file_and_field(saved_model, tmp_path, changes, field):
    from patchcore.estimator.state import FittedState

    path = _edited(saved_model, tmp_path, **changes)
    tensors, header = read_model_file(path)
    with pytest.raises(ModelFileError) as info:
        FittedState.from_file(tensors, header, path)
    message = str(info.value)
    assert str(path) in message and f"field {field}" in message, message


@pytest.mark.parametrize("changes, match", [
    ({"blur_sigma": 1000.0}, "blur_sigma"),
    ({"blur_sigma": NAN}, "blur_sigma"),
    ({"resize": 100_000}, "resize"),
    ({"crop": [64, 20_000]}, "crop"),
    ({"embedding_dim": 1 << 20}, "embedding_dim"),
    ({"coreset_size": -5}, "coreset_size"),
    ({"patch_size": "3"}, "patch_size"),
    ({"feature_strides": [8, "16"]}, "feature_strides"),
    ({"banana": 1}, "unknown PatchCoreConfig fields"),
])
def test_invalid_config_in_a_model_file_names_the_file_and_field(saved_model, tmp_path, changes, match):
    from patchcore import PatchCore

    path = _edited(saved_model, tmp_path, header={"config": _config_with(saved_model, **changes)})
    with pytest.raises(ModelFileError, match=match) as info:
        PatchCore.load(path, device="cpu")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("header", [{"config": ...}, {"config": [1, 2]}, {"config": "x"}])
def test_missing_config_is_a_model_file_error_not_a_key_error(saved_model, tmp_path, header):
    from patchcore import PatchCore
    from patchcore.estimator.state import config_from_file

    path = _edited(saved_model, tmp_path, header=header)
    with pytest.raises(ModelFileError) as info:
        PatchCore.load(path, device="cpu")
    assert str(path) in str(info.value)
    with pytest.raises(ModelFileError, match="field config"):
        config_from_file(read_model_file(path)[1], path)


def test_config_from_file_round_trips_and_replaces_the_weights(saved_model):
    from patchcore import PatchCore
    from patchcore.estimator.state import config_from_file

    header = read_model_file(saved_model)[1]
    assert config_from_file(header, saved_model) == PatchCore.load(saved_model, device="cpu").config
    assert config_from_file(header, saved_model, weights="/w.pth").weights == "/w.pth"


def test_a_valid_model_passes_validation_and_loads(saved_model):
    from patchcore import PatchCore
    from patchcore.estimator.state import FittedState

    tensors, header = read_model_file(saved_model, tensor_schema=FittedState.TENSORS)
    FittedState.from_file(tensors, header, saved_model)
    model = PatchCore.load(saved_model, device="cpu")
    assert model.distance_scale_ > 0 and model.image_threshold_ is not None


def test_cli_refuses_a_nan_bank_in_one_line(saved_model, tmp_path, capsys, category):
    from patchcore.app.cli import main

    path = _edited(saved_model, tmp_path, tensors=lambda t: {"memory_bank": torch.full_like(t["memory_bank"], NAN)})
    code = main(["predict", str(path), str(category / "test" / "good"), "-o", str(tmp_path / "out"), "--quiet",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(path) in err and "memory_bank" in err and "NaN" in err
    assert not (tmp_path / "out" / "scores.json").exists()


def test_an_output_path_ending_with_a_separator_is_refused(tmp_path):
    from patchcore.errors import OutputError
    from patchcore.io.model_file import check_output_file

    with pytest.raises(OutputError, match="path separator"):
        check_output_file(str(tmp_path / "models") + "/")  # meant a folder that does not exist yet
    assert not (tmp_path / "models").exists()


def test_format_version_true_is_not_version_1(tmp_path):
    path = tmp_path / "bool.patchcore"
    _write_raw(path, {"format": FORMAT_NAME, "format_version": True})  # True == 1 in Python
    with pytest.raises(ModelFileError, match="version True"):
        read_model_file(path)
