"""The model file: one safetensors file, tensors plus a JSON header. No pickle anywhere.

Loading a file never runs code from it: safetensors holds raw tensor bytes, and our metadata is plain
JSON. Writes are atomic (temporary file in the same folder, fsync, rename), so a crash mid-write
leaves any previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError

FORMAT_NAME = "patchcore-model"
FORMAT_VERSION = 1
_METADATA_KEY = "patchcore"


def write_model_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save

    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    payload = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={_METADATA_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(Path(path), payload)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = path.read_bytes()
        tensors = load(payload)
        header = _read_header(payload)
    except (SafetensorError, ValueError, OSError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path}: not a patchcore model file or damaged ({err})") from None
    if header.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path}: not a patchcore model file (safetensors without patchcore metadata)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version} is not supported by this patchcore "
                             f"(it reads version {FORMAT_VERSION}); use the patchcore release that wrote it, "
                             f"{header.get('package_version', 'unknown')}, or refit")
    return tensors, header


def _read_header(payload: bytes) -> dict[str, Any]:
    """The JSON metadata in the safetensors header (8-byte little-endian length, then JSON)."""
    if len(payload) < 8:
        raise ValueError("file too short")
    length = int.from_bytes(payload[:8], "little")
    if length > len(payload) - 8:
        raise ValueError("header length exceeds file size")
    metadata = json.loads(payload[8:8 + length]).get("__metadata__") or {}
    if _METADATA_KEY not in metadata:
        return {}
    header = json.loads(metadata[_METADATA_KEY])
    if not isinstance(header, dict):
        raise ValueError("patchcore metadata is not a JSON object")
    return header
