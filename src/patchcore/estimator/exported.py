"""A PatchCore whose scoring goes through an exported graph and patchcore.runtime: `--runtime onnx`.

Everything else is the estimator's own (loading and checking the model file, update, save, thresholds,
maps at original size, the server's swaps), so `patchcore predict` and `patchcore serve` behave the same on
either runtime; only `_score_stack`, the one scoring core, is replaced. The torch backbone is built only
when something needs features outside scoring (an incremental update).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..runtime import Runtime
from ..runtime.backends import Session
from ..runtime.bundle import default_export_dir, read_manifest
from .model import PatchCore, PatchCoreResult, _Fitted

__all__ = ["ExportedPatchCore", "default_export_dir"]


class ExportedPatchCore(PatchCore):
    """PatchCore scored by the runtime (onnxruntime / OpenVINO graph + numpy search and scoring)."""

    runtime: Runtime

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", weights: str | None = None,
             export_dir: str | Path | None = None, backend: str = "onnxruntime", threads: int | None = None,
             precision: str = "fp32") -> ExportedPatchCore:
        model = super().load(path, device="cpu", weights=weights)
        export_dir = Path(export_dir) if export_dir is not None else default_export_dir(path)
        # The runtime checks the export against the model file (weights, embedding size, graph digest).
        model.runtime = Runtime.load(path, export_dir, backend=backend, threads=threads, precision=precision)
        return model

    @classmethod
    def from_model(cls, model: PatchCore, export_dir: str | Path, *, backend: str = "onnxruntime",
                   threads: int | None = None, precision: str = "fp32") -> ExportedPatchCore:
        """Wrap an already loaded PatchCore (its state is shared, not copied)."""
        manifest = read_manifest(export_dir)
        exported = cls(model.config, device="cpu")
        exported.extractor = model.extractor
        exported.set_state(model.state_)
        session = Session(Path(export_dir) / manifest["graph"], backend, threads=threads, precision=precision)
        exported.runtime = Runtime(model.config, model.state_, session, manifest)
        return exported

    @torch.inference_mode()
    def _score_stack(self, images: torch.Tensor, fitted: _Fitted, *, at_input: bool = False) -> PatchCoreResult:
        arrays = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())
        result = self.runtime.score_stack(arrays, state=fitted.state, at_input=at_input)
        return PatchCoreResult(torch.from_numpy(result.scores), torch.from_numpy(result.maps),
                               None if result.labels is None else torch.from_numpy(result.labels),
                               None if result.masks is None else torch.from_numpy(result.masks))
