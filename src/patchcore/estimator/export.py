"""Export the embedding to ONNX: everything before the nearest-neighbour search, nothing after it.

The graph is phi (the truncated, BN-folded backbone) and the locally aware patch features (core/features.py:
channel reduction, p x p aggregation, level fusion): normalised float (B, 3, H, W) -> (B, h, w, D). The
memory bank, thresholds, distance scale and geometry stay in the model file beside it, so an incremental
update (`patchcore update`) needs no re-export, and the graph is a few MB whatever the bank (anomalib bakes
the bank into the graph). The batch axis is dynamic; height and width are dynamic unless the config fixes
the model input (a crop, or an exact H,W resize), where a static size gives the runtime a simpler graph.

`export_model` checks itself: it scores images through the library and through patchcore.runtime and
refuses (ExportError) unless image scores agree within 1e-4 relative, maps within 1e-3, and labels match.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..backbones.networks import resolve
from ..core.features import patch_embeddings
from ..errors import PatchCoreError
from ..io.model_file import atomic_write_bytes
from ..runtime.bundle import EXPORT_FORMAT, EXPORT_VERSION, GRAPH_NAME, MANIFEST_NAME
from .model import PatchCore

OPSET = 18
SCORE_RTOL, MAP_RTOL = 1e-4, 1e-3  # issue 17: image scores within 1e-4 relative, maps within 1e-3


class ExportError(PatchCoreError):
    """The export could not be written, or the exported graph does not score as the library does."""


class EmbeddingGraph(nn.Module):
    """normalised float (B, 3, H, W) -> (B, h, w, D) patch features: what FeatureExtractor._one_pass computes."""

    def __init__(self, model: PatchCore):
        super().__init__()
        backbone = model.backbone
        # A CPU float32 copy: the model's own network keeps its device (it may be serving on a GPU).
        self.network = copy.deepcopy(backbone.network).float().cpu()
        self.indices = list(backbone.indices)
        self.patch_size = model.config.patch_size
        _, _, reductions = model.extractor._build()
        self.scales: list[float | None] = []
        for i, reduction in enumerate(reductions):
            if isinstance(reduction, torch.Tensor):
                self.register_buffer(f"pool{i}", reduction.detach().float().cpu())
                self.scales.append(None)
            else:
                self.scales.append(reduction)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.network.forward_intermediates(images, indices=self.indices, intermediates_only=True)
        reductions = [getattr(self, f"pool{i}") if scale is None else scale for i, scale in enumerate(self.scales)]
        features = patch_embeddings(maps, reductions, self.patch_size)  # (B, h*w, D)
        return features.reshape(images.shape[0], maps[0].shape[-2], maps[0].shape[-1], features.shape[-1])


@dataclass
class ExportReport:
    directory: Path
    graph_bytes: int
    dynamic_size: bool
    export_seconds: float
    checked_images: int
    max_score_rel_diff: float
    max_map_rel_diff: float
    labels_equal: bool


def fixed_input_size(model: PatchCore) -> tuple[int, int] | None:
    """The one model input size every image gets, or None when it depends on the image (dynamic H, W)."""
    config = model.config
    if config.tile_size is not None:
        return None
    if config.crop is not None:
        crop = config.crop
        return (crop, crop) if isinstance(crop, int) else tuple(crop)
    if isinstance(config.resize, tuple):
        return config.resize
    return None


def export_model(model: PatchCore, model_path: str | Path, out_dir: str | Path, *, check_images: list | None = None,
                 verify: bool = True, static_size: bool = False) -> ExportReport:
    """Write DIR/embedding.onnx and DIR/export.json for a fitted model saved at `model_path`, then score
    `check_images` (default: a few seeded synthetic images at the model's geometry) through both paths.
    `static_size`: a graph for the training input size only, even where the geometry allows others (the
    dynamic-size export of TF-padded EfficientNets takes minutes; the static one seconds)."""
    state = model.state_
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    graph = EmbeddingGraph(model).eval()
    if static_size and model.config.tile_size is not None:
        raise ExportError("a tiled model needs a graph of dynamic height and width (its tiles differ in size)")
    fixed = fixed_input_size(model) or (tuple(state.input_size) if static_size else None)
    height, width = fixed or tuple(state.input_size)
    example = torch.zeros(2, 3, height, width)
    dynamic = {0: torch.export.Dim.DYNAMIC}
    if fixed is None:
        dynamic.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    try:
        program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                    output_names=["features"], dynamic_shapes={"images": dynamic},
                                    optimize=True, verbose=False)
    except Exception as err:  # the exporter's own errors are many types; this is the user's failure
        raise ExportError(f"ONNX export of {model.config.backbone} failed: {type(err).__name__}: {err}") from err
    graph_path = out_dir / GRAPH_NAME
    tmp = out_dir / f".{GRAPH_NAME}.tmp"
    program.save(str(tmp))
    payload = tmp.read_bytes()
    tmp.unlink()
    atomic_write_bytes(graph_path, payload)
    spec, _ = resolve(model.config.backbone)
    manifest = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "package_version": __version__,
        "graph": GRAPH_NAME, "graph_sha256": hashlib.sha256(payload).hexdigest(), "opset": OPSET,
        "backbone": model.config.backbone, "backbone_weights_sha256": state.backbone_weights_sha256,
        "mean": list(spec.mean), "std": list(spec.std), "feature_strides": list(model.backbone.strides),
        "embedding_dim": int(state.memory_bank.shape[1]), "dynamic_size": fixed is None,
        "input_size": None if fixed is None else list(fixed),
        "torch_version": torch.__version__,
    }
    atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    seconds = time.perf_counter() - started
    report = ExportReport(out_dir, len(payload), fixed is None, seconds, 0, 0.0, 0.0, True)
    if verify:
        if static_size and not check_images:
            check_images = check_images_for(model)[:1]  # the training input size: the one the graph takes
        try:
            report = dataclasses.replace(report, **verify_export(model, model_path, out_dir, check_images))
        except BaseException:  # a graph that does not score as the library does is never left usable
            (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
            raise
    return report


def check_images_for(model: PatchCore, count: int = 3) -> list[np.ndarray]:
    """Seeded synthetic (H, W, 3) uint8 images: smooth structure plus noise. Their sizes need no resize where
    the geometry allows (the shorter side at an int resize, the exact size at an H,W resize, any size at none),
    so the check compares the graph and the scoring, not Pillow's resize against torch's (measured apart);
    with dynamic H and W they come in three sizes."""
    config = model.config
    rng = np.random.default_rng(0)
    height, width = model.state_.input_size
    align = config.feature_strides[-1]
    if isinstance(config.resize, int):
        r = config.resize
        sizes = [(r, r), (r, r + 3 * align), (r + 2 * align, r)]
    elif isinstance(config.resize, tuple):
        sizes = [tuple(config.resize)]
    else:  # none: every size as it is; scale: the model's own input size, and two others
        sizes = [(height, width), (height + 2 * align, width + 3 * align), (max(2 * align, height - align), width)]
    if fixed_input_size(model) is None and config.crop is None and model.state_.region is None:
        sizes = (sizes * count)[:count]
    else:
        sizes = [sizes[0]] * min(count, 2)
    images = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = 127 + 60 * np.sin(yy[..., None] / 9.0 + np.arange(3)) * np.cos(xx[..., None] / 13.0)
        images.append(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))
    return images


def verify_export(model: PatchCore, model_path: str | Path, out_dir: str | Path, images: list | None) -> dict:
    """Score `images` through the library and the runtime; ExportError unless they agree (issue 17 bounds)."""
    from ..runtime import Runtime

    images = check_images_for(model) if not images else images
    runtime = Runtime.load(model_path, out_dir)
    worst_score = worst_map = 0.0
    labels_equal = True
    for image in images:  # one at a time: images of different sizes give maps of different sizes
        ours = runtime.predict([image])
        ref = model.predict(image if not isinstance(image, np.ndarray) else torch.from_numpy(
            np.ascontiguousarray(image.transpose(2, 0, 1)))[None])
        ref_scores, ref_maps = ref.scores.numpy(), ref.maps.numpy()
        worst_score = max(worst_score, float(np.max(np.abs(ours.scores - ref_scores) / np.abs(ref_scores).clip(1e-12))))
        ours_map = ours.maps[0] if isinstance(ours.maps, list) else ours.maps
        worst_map = max(worst_map, float(np.max(np.abs(ours_map - ref_maps) / np.abs(ref_maps).max().clip(1e-12))))
        if ref.labels is not None:
            labels_equal &= bool(np.array_equal(ours.labels, ref.labels.numpy()))
    if worst_score > SCORE_RTOL or worst_map > MAP_RTOL or not labels_equal:
        raise ExportError(f"the exported graph does not score as the library does: image scores differ by up to "
                          f"{worst_score:.2e} relative (bound {SCORE_RTOL:g}), maps by {worst_map:.2e} (bound "
                          f"{MAP_RTOL:g}), labels {'equal' if labels_equal else 'DIFFER'}; {out_dir} is not usable")
    return dict(checked_images=len(images), max_score_rel_diff=worst_score, max_map_rel_diff=worst_map,
                labels_equal=labels_equal)


INT8_GRAPH = "embedding.int8.onnx"


def quantize_int8(model_path: str | Path, out_dir: str | Path, images: list, *, max_images: int = 32) -> dict:
    """Static int8 quantisation (QDQ, per-channel weights) of an exported graph, calibrated on `images` (the
    model's own training images), written beside it and recorded in export.json under "int8". Only ever an
    explicit choice (`--precision int8`): it changes the features (measured in docs/RUNTIME.md)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ..io.images import read_image
    from ..runtime import Runtime

    out_dir = Path(out_dir)
    runtime = Runtime.load(model_path, out_dir)
    chosen = list(images)[:max_images]
    if not chosen:
        raise ExportError("int8 calibration needs images (the model's training images)")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.pending = iter(chosen)

        def get_next(self):
            image = next(self.pending, None)
            if image is None:
                return None
            pixels = read_image(image) if isinstance(image, (str, Path)) else image
            return {"images": runtime.preprocess([pixels])}

    tmp = out_dir / f".{INT8_GRAPH}.tmp"
    quantize_static(str(out_dir / GRAPH_NAME), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    payload = tmp.read_bytes()
    tmp.unlink()
    atomic_write_bytes(out_dir / INT8_GRAPH, payload)
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    manifest["int8"] = {"graph": INT8_GRAPH, "sha256": hashlib.sha256(payload).hexdigest(),
                        "calibration_images": len(chosen), "format": "QDQ, per-channel int8 weights, uint8 activations"}
    atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest["int8"]
