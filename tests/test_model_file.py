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
