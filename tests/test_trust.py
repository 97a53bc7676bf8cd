"""Issue 16, "trust on the line": no lost model, no deleted file, no silent wrong answer, no process death.

Each test names the case of the issue it covers; each failed on the code before its fix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.errors import ModelFileError
from patchcore.io.model_file import read_model_file, write_model_file


@pytest.fixture(scope="module")
def small_models(train_paths, tmp_path_factory):
    """Two different small models (random backbone, 64 px) saved to files: (a, b)."""
    folder = tmp_path_factory.mktemp("trust")
    paths = []
    for i, ratio in enumerate((0.1, 0.5)):
        config = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, coreset_ratio=ratio, batch_size=4)
        path = folder / f"m{i}.model"
        PatchCore(config, device="cpu").fit(train_paths[:12]).save(path)
        paths.append(path)
    return paths


def _child(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------- model files read into memory
def test_a_loaded_file_truncated_in_place_does_not_kill_the_process(tmp_path):
    """Case: model file replaced in place while loaded -> SIGBUS (the bank was memory-mapped)."""
    path = tmp_path / "m.model"
    write_model_file(path, {"memory_bank": torch.arange(200_000, dtype=torch.float32).reshape(-1, 100)}, {})
    result = _child(f"""
        import os
        from patchcore.io.model_file import read_model_file
        tensors, _ = read_model_file({str(path)!r})
        os.truncate({str(path)!r}, 64)
        print(int(tensors["memory_bank"].double().sum()))
    """)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert int(result.stdout) == sum(range(200_000))


def test_a_served_model_keeps_its_answers_when_its_file_is_overwritten_in_place(small_models, category):
    """Case: `cp other.model served.model` changed scores silently with no reload."""
    a, b = small_models
    served = a.with_name("served.model")
    served.write_bytes(a.read_bytes())
    model = PatchCore.load(served, device="cpu")
    images = sorted((category / "test").glob("*/*.png"))[:4]
    before = model.predict(images).scores.clone()
    with open(served, "r+b") as handle:  # the same inode, other bytes (what cp onto an existing file does)
        handle.write(b.read_bytes())
    assert torch.equal(model.predict(images).scores, before)
    assert torch.equal(PatchCore.load(served, device="cpu").memory_bank_, PatchCore.load(b, device="cpu").memory_bank_)


def test_a_file_that_ends_inside_a_tensor_is_a_model_file_error(tmp_path, monkeypatch):
    path = tmp_path / "m.model"
    write_model_file(path, {"memory_bank": torch.ones(100, 10)}, {})
    import patchcore.io.model_file as model_file

    real = model_file._read_tensors

    def truncate_then_read(p, handle, entries, *, data_start):  # the file shrinks after its header was read
        os.truncate(path, data_start + 40)
        return real(p, handle, entries, data_start=data_start)

    monkeypatch.setattr(model_file, "_read_tensors", truncate_then_read)
    with pytest.raises(ModelFileError, match="ends inside tensor 'memory_bank'"):
        read_model_file(path)


def _sparse_copy(source: Path, target: Path, rows: int, **fitted) -> None:
    """`source`'s header with a bank of `rows` rows (zeros: a sparse file) and `fitted` fields changed."""
    tensors, header = read_model_file(source)
    header = {k: v for k, v in header.items() if k not in ("format", "format_version")}
    header["format"], header["format_version"] = "patchcore-model", 1
    header["fitted"].update(fitted)
    dim = tensors["memory_bank"].shape[1]
    nbytes = rows * dim * 4
    document = {"__metadata__": {"patchcore": json.dumps(header, sort_keys=True)},
                "memory_bank": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, nbytes]}}
    raw = json.dumps(document).encode()
    raw += b" " * (-len(raw) % 8)
    with open(target, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + nbytes)


def test_a_sparse_hostile_model_file_is_refused_from_its_header_unread(small_models, tmp_path):
    """Case: a sparse hostile model file took 16.8 GB of RAM before it was refused."""
    hostile = tmp_path / "sparse.model"
    tensors, _ = read_model_file(small_models[0])
    _sparse_copy(small_models[0], hostile, rows=(3 << 30) // (4 * tensors["memory_bank"].shape[1]))  # 3 GiB
    result = _child(f"""
        import resource, sys
        from patchcore import PatchCore
        from patchcore.errors import ModelFileError
        try:
            PatchCore.load({str(hostile)!r}, device="cpu")
        except ModelFileError as err:
            print("refused:", err, file=sys.stderr)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused:" in result.stderr and "n_train_patches" in result.stderr
    assert int(result.stdout.split()[-1]) < 1500, result.stdout  # MiB; the bank alone would be 3072
