"""The export folder's manifest (export.json beside embedding.onnx): what the graph is and what it expects.

Written by estimator/export.py, read by the runtime. The bank, thresholds and geometry are not here: they
stay in the model file, which the runtime reads at load (an incremental update needs no re-export).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

EXPORT_FORMAT = "patchcore-onnx-export"
EXPORT_VERSION = 1
GRAPH_NAME = "embedding.onnx"
MANIFEST_NAME = "export.json"
MAX_MANIFEST_BYTES = 1 << 20


def default_export_dir(model_path: str | Path) -> Path:
    """Where `patchcore export MODEL` writes when no -o is given, and where the runtime looks: MODEL.onnx/."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".onnx")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """DIR/export.json, checked: ModelFileError naming the file for anything missing or malformed."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ModelFileError(f"{path}: no export manifest here (write one with `patchcore export MODEL -o DIR`)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelFileError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes: not an export manifest")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ModelFileError(f"{path}: not a readable export manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ModelFileError(f"{path}: not a patchcore export manifest")
    if manifest.get("format_version") != EXPORT_VERSION:
        raise ModelFileError(f"{path}: export format version {manifest.get('format_version')} is not supported "
                             f"(this runtime reads version {EXPORT_VERSION}); export again")
    checks = {"graph": str, "backbone_weights_sha256": str, "mean": list, "std": list, "feature_strides": list,
              "embedding_dim": int, "dynamic_size": bool}
    for name, kind in checks.items():
        if not isinstance(manifest.get(name), kind):
            raise ModelFileError(f"{path}: field {name} missing or not a {kind.__name__}")
    for name in ("mean", "std"):
        values = manifest[name]
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ModelFileError(f"{path}: field {name} must be three numbers")
    if "/" in manifest["graph"] or "\\" in manifest["graph"] or manifest["graph"].startswith("."):
        raise ModelFileError(f"{path}: field graph must name a file in the export folder")
    return manifest
