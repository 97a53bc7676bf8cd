"""The model file: one safetensors file, tensors plus a JSON header. No pickle anywhere.

Loading a file never runs code from it: safetensors holds raw tensor bytes, and our metadata is plain
JSON, checked against bounds before any tensor data is read. Writes are atomic (temporary file in the
same folder, fsync, rename), so a crash, a full disk or Ctrl-C mid-write leaves any previous file intact.

Tensors are copied into memory through one open file handle, never memory-mapped: a served model whose
file is replaced or truncated in place (`cp other.model served.model`) would otherwise kill the process
with SIGBUS on the next access to a vanished page, or change its answers with no reload.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelFileError, OutputError

FORMAT_NAME = "patchcore-model"
FORMAT_VERSION = 1
ENSEMBLE_FORMAT_NAME = "patchcore-ensemble"  # several members' banks and headers in one file (estimator/ensemble.py)
_METADATA_KEY = "patchcore"

if TYPE_CHECKING:  # torch is imported where tensors are made: the torch-free runtime reads model files too
    import torch


def write_model_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *,
                     format_name: str = FORMAT_NAME) -> None:
    from safetensors.torch import save

    header = {"format": format_name, "format_version": FORMAT_VERSION, **metadata}
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={_METADATA_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(Path(path), payload)


def check_output_file(path: str | Path) -> Path:
    """Before any work: can a file be written at `path`? Returns the path to write (a symbolic link is
    followed, as a plain write would). Missing parent folders are fine (the write creates them) if the
    nearest existing one is a writable folder. Raises OutputError naming the path otherwise."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):
        raise OutputError(f"{path}: ends with a path separator; give the file to write, e.g. {path}model.patchcore")
    path = Path(path)
    if path.is_symlink():
        try:
            path = path.resolve(strict=True)
        except (OSError, RuntimeError) as err:  # a loop (RuntimeError before Python 3.13) or a dangling link
            if not isinstance(err, FileNotFoundError):
                raise OutputError(f"{path}: a symbolic link that cannot be followed ({err})") from None
            path = path.resolve()
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give the file to write, e.g. {path / 'model.patchcore'}")
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: exists and is not a regular file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():  # a dangling link in the path
            raise OutputError(f"{folder}: a broken symbolic link in the output path")
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{folder}: is not a folder, so {path} cannot be written")
    probe_writable(folder)
    return path


def probe_writable(folder: Path) -> None:
    """Create and remove a temporary file in `folder` (access bits are not enough: read-only mounts,
    ACLs, root); OutputError naming the folder if that fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".patchcore-write-test.", dir=folder)
    except OSError as err:
        raise OutputError(f"{folder}: cannot write here ({err.strerror or err})") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` so that it is either completely written or not at all: a temporary file in
    the same folder, fsync, rename over the target. The file gets the mode a plain open() would give (0666
    less the umask), not mkstemp's 0600. Any OSError (a full disk, no permission) becomes an OutputError
    naming the path; on any failure, Ctrl-C included, the temporary file is removed and a previous file
    at `path` is unchanged."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(path)
        # Named by our pid: a write killed with SIGKILL leaves this file, and the next write removes it.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
        tmp = None
        _fsync_folder(path.parent)
    except OSError as err:
        raise OutputError(f"{path}: could not write the file ({err}); nothing was written there, "
                          f"a previous file at that path is unchanged") from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def remove_stale_temporary_files(path: Path) -> list[Path]:
    """Remove the temporary files `.<name>.<pid>.<random>.tmp` of earlier writes of `path` whose process no
    longer runs (a killed save); those of running processes (a concurrent write) stay."""
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _process_running(int(pid)):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc); elsewhere set
    and restored at once."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Bounds checked on the safetensors header before any tensor data is read.
MAX_HEADER_BYTES = 16 << 20  # our header is a few kB (the calibration scores dominate)
MAX_TENSOR_NDIM = 8
_ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def read_model_file(path: str | Path, *, tensor_schema: dict[str, tuple[str, int]] | None = None,
                    optional_tensors: dict[str, tuple[str, int]] | None = None,
                    check_header: Callable[[dict[str, tuple[str, list[int]]], dict[str, Any]], None] | None = None,
                    as_numpy: bool = False, format_name: str = FORMAT_NAME
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file: its tensors and its patchcore header.

    The safetensors header is read and checked first (length, JSON, dtypes, shapes, data offsets inside
    the file); only then are the tensors read, one at a time, copied into memory from the one open
    handle (never memory-mapped, never the whole file at once). `tensor_schema`, {name: (safetensors
    dtype, ndim)}, also requires exactly these tensors with these dtypes and ranks, checked before any
    tensor data is read; `optional_tensors` may be there too, with their dtype and rank. `check_header(
    {name: (dtype, shape)}, header)` runs after that and before any data is read, so a file whose header
    declares gigabytes the model would refuse is refused without reading them. Every problem is a
    ModelFileError naming the file. `as_numpy`: the tensors as numpy arrays (the torch-free runtime).
    `format_name`: the kind of file expected (a single model, or an ensemble).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                entries, metadata = _read_safetensors_header(handle, size)
                header = _patchcore_header(metadata)
            except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
                raise ModelFileError(f"{path}: not a patchcore model file or damaged ({err})") from None
            if header.get("format") != format_name:
                if header.get("format") == ENSEMBLE_FORMAT_NAME:
                    raise ModelFileError(f"{path}: an ensemble model file (several backbones); this path takes a "
                                         "single model (load either kind with patchcore.load_model)")
                if header.get("format") == FORMAT_NAME:
                    raise ModelFileError(f"{path}: a single model file, not an ensemble")
                raise ModelFileError(f"{path}: not a patchcore model file (safetensors without patchcore metadata)")
            version = header.get("format_version")
            if version != FORMAT_VERSION or isinstance(version, bool):
                raise ModelFileError(f"{path}: model format version {version} is not supported by this patchcore "
                                     f"(it reads version {FORMAT_VERSION}); use the patchcore release that wrote "
                                     f"it, {header.get('package_version', 'unknown')}, or refit")
            if tensor_schema is not None:
                _check_tensor_schema(path, entries, tensor_schema, optional_tensors or {})
            if check_header is not None:
                check_header({name: (e["dtype"], list(e["shape"])) for name, e in entries.items()}, header)
            tensors = _read_tensors(path, handle, entries, data_start=handle.tell(), as_numpy=as_numpy)
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read the model file ({err})") from None
    return tensors, header


def read_model_format(path: str | Path) -> str | None:
    """The "format" a model file declares (FORMAT_NAME, ENSEMBLE_FORMAT_NAME, ...), from its header alone (no
    tensor data read): which loader to use. None when the file has no patchcore header; ModelFileError when it
    cannot be read at all."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with open(path, "rb") as handle:
            _, metadata = _read_safetensors_header(handle, os.fstat(handle.fileno()).st_size)
            kind = _patchcore_header(metadata).get("format")
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: not a patchcore model file or damaged ({err})") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read the model file ({err})") from None
    return kind if isinstance(kind, str) else None


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
            "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "I16": torch.int16, "F16": torch.float16,
            "BF16": torch.bfloat16, "U32": torch.uint32, "I32": torch.int32, "F32": torch.float32,
            "U64": torch.uint64, "I64": torch.int64, "F64": torch.float64}


_NUMPY_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
                 "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64,
                 "I64": np.int64, "F64": np.float64}  # little-endian machines, as safetensors data


def _read_tensors(path: Path, handle, entries: dict[str, dict], *, data_start: int,
                  as_numpy: bool = False) -> dict[str, torch.Tensor]:
    """Each tensor's bytes copied from `handle` into memory it owns (safetensors data is little-endian, as
    the machines torch runs on). A file that ends early (truncated after its header was read) is a
    ModelFileError, not a crash."""
    tensors = {}
    dtypes = _NUMPY_DTYPES if as_numpy else _torch_dtypes()
    for name, entry in entries.items():
        if entry["dtype"] not in dtypes:
            raise ModelFileError(f"{path}: tensor {name!r} of dtype {entry['dtype']} cannot be read without torch")
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        handle.seek(data_start + begin)
        view, got = memoryview(buffer), 0
        while got < len(buffer):
            n = handle.readinto(view[got:])
            if not n:
                raise ModelFileError(f"{path}: the file ends inside tensor {name!r} (truncated or being rewritten "
                                     f"while it was read)")
            got += n
        dtype = dtypes[entry["dtype"]]
        if as_numpy:
            tensors[name] = np.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
            continue
        import torch

        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def _read_safetensors_header(handle, size: int) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and the string metadata of a safetensors file, bounds-checked."""
    if size < 8:
        raise ValueError("file too short")
    length = int.from_bytes(handle.read(8), "little")
    if length > size - 8:
        raise ValueError("header length exceeds file size")
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"header of {length} bytes, more than the {MAX_HEADER_BYTES} allowed")
    raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("file shorter than its header")
    document = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    if not isinstance(document, dict):
        raise ValueError("safetensors header is not a JSON object")
    metadata = document.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("safetensors metadata is not an object of strings")
    data_size = size - 8 - length
    for name, entry in document.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r}: malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEM_SIZES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_NDIM
                or not all(_is_count(n) for n in shape)):
            raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
            raise ValueError(f"tensor {name!r}: bad data offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ValueError(f"tensor {name!r}: data offsets {offsets} outside the file's {data_size} data bytes "
                             f"(truncated?)")
        count = 1
        for n in shape:
            count *= n
        if end - begin != count * _ITEM_SIZES[dtype]:
            raise ValueError(f"tensor {name!r}: {end - begin} data bytes for shape {shape} of {dtype}")
    return document, metadata


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys in the header: {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _patchcore_header(metadata: dict[str, str]) -> dict[str, Any]:
    """Our JSON object inside the safetensors metadata ({} if there is none)."""
    if _METADATA_KEY not in metadata:
        return {}
    header = json.loads(metadata[_METADATA_KEY], object_pairs_hook=_no_duplicate_keys)
    if not isinstance(header, dict):
        raise ValueError("patchcore metadata is not a JSON object")
    return header


def _check_tensor_schema(path: Path, entries: dict[str, dict], schema: dict[str, tuple[str, int]],
                         optional: dict[str, tuple[str, int]]) -> None:
    missing, extra = sorted(set(schema) - set(entries)), sorted(set(entries) - set(schema) - set(optional))
    schema = {**schema, **{name: kind for name, kind in optional.items() if name in entries}}
    if missing:
        raise ModelFileError(f"{path}: invalid model file: tensor {missing[0]!r} is missing")
    if extra:
        raise ModelFileError(f"{path}: invalid model file: unexpected tensors {extra} (this format holds only "
                             f"{sorted(schema)})")
    for name, (dtype, ndim) in schema.items():
        entry = entries[name]
        if entry["dtype"] != dtype or len(entry["shape"]) != ndim:
            raise ModelFileError(f"{path}: invalid model file: tensor {name!r} must be {ndim}-D {dtype}, got "
                                 f"{len(entry['shape'])}-D {entry['dtype']} of shape {entry['shape']}")
