"""phi and the locally aware patch features (PATCHCORE.md section 1) behind one call: uint8 images in,
(B, h*w, D) patch features out. Built lazily (loading weights takes seconds) and exactly once, also
when several threads ask at the same time."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..backbones import Backbone, build_backbone
from ..config import PatchCoreConfig
from ..core.features import level_dims, level_reductions, patch_embeddings
from ..io.preprocess import Preprocess


@dataclass(frozen=True)
class Embedding:
    features: torch.Tensor  # (B, h*w, D) patch features
    grid: tuple[int, int]  # (h, w): the finest level's grid
    input_size: tuple[int, int]  # (H', W'): the preprocessed input size the maps are drawn at


class FeatureExtractor:
    """Frozen backbone + preprocessing + per-level channel reductions, as the config says."""

    def __init__(self, config: PatchCoreConfig, device: torch.device):
        self.config = config
        self.device = device
        self._lock = threading.Lock()
        self._built: tuple[Backbone, Preprocess, list] | None = None

    def _build(self) -> tuple[Backbone, Preprocess, list]:
        built = self._built
        if built is not None:
            return built
        with self._lock:
            if self._built is None:
                cfg = self.config
                backbone, spec = build_backbone(cfg.backbone, cfg.feature_strides, weights=cfg.weights, seed=cfg.seed)
                backbone = backbone.to(self.device)  # keeps the channels-last layout Backbone chose
                preprocess = Preprocess(cfg.resize, cfg.crop, spec.mean, spec.std)
                reductions = [r.to(self.device) if isinstance(r, torch.Tensor) else r
                              for r in level_reductions(backbone.channels, cfg.embedding_dim)]
                self._built = (backbone, preprocess, reductions)
            return self._built

    @property
    def backbone(self) -> Backbone:
        return self._build()[0]

    @property
    def preprocess(self) -> Preprocess:
        return self._build()[1]

    @property
    def embedding_dim(self) -> int:
        """D: the stored width of each level, summed."""
        return sum(level_dims(self.backbone.channels, self.config.embedding_dim))

    @property
    def weights_sha256(self) -> str:
        return self.backbone.weights_sha256

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> Embedding:
        """uint8 (B, 3, H, W) -> Embedding((B, h*w, D), (h, w), (H', W'))."""
        backbone, preprocess, reductions = self._build()
        x = preprocess(images.to(self.device, non_blocking=True))
        feature_maps = backbone(x)  # Backbone.forward makes the input channels-last on every device
        grid = tuple(feature_maps[0].shape[-2:])
        features = patch_embeddings(feature_maps, reductions, self.config.patch_size)
        return Embedding(features, grid, tuple(x.shape[-2:]))
