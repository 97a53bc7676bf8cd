"""phi and the locally aware patch features (PATCHCORE.md section 1) behind one call: uint8 images in,
(B, h*w, D) patch features out, in one pass or tile by tile (core/tiling.py). Built lazily (loading
weights takes seconds) and exactly once, also when several threads ask at the same time."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..backbones import Backbone, build_backbone
from ..config import PatchCoreConfig
from ..core.features import level_dims, level_reductions, patch_embeddings
from ..core.tiling import TileSpan, tile_spans
from ..errors import InputError
from ..io.preprocess import Preprocess


@dataclass(frozen=True)
class Piece:
    """The patch features of one tile's kept part: grid rows [top, top + height), columns [left, left + width)
    of the full image's finest grid. Without tiling, one piece is the whole grid."""

    features: torch.Tensor  # (B, height * width, D), row-major
    top: int
    left: int
    height: int
    width: int


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
                preprocess = Preprocess(cfg.resize, cfg.crop, spec.mean, spec.std, scale=cfg.scale,
                                        align=cfg.feature_strides[-1])
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

    def pieces(self, images: torch.Tensor, *, at_input: bool = False
               ) -> tuple[tuple[int, int], tuple[int, int], Iterator[Piece]]:
        """uint8 (B, 3, H, W) -> full grid (h, w), input size (H', W'), and the pieces that cover the grid.
        `at_input`: the images are already resized and cropped to the model input (only normalised here).

        With `tile_size`, each tile goes through the backbone on its own: activation memory is that of
        one tile; the input itself is preprocessed whole (3 floats per pixel)."""
        backbone, preprocess, reductions = self._build()
        images = images.to(self.device, non_blocking=True)
        x = preprocess.normalise(images) if at_input else preprocess(images)
        height, width = x.shape[-2:]
        finest, deepest = backbone.strides[0], backbone.strides[-1]
        tile = self.config.tile_size
        if tile is None:
            piece = self._one_pass(x)
            return (piece.height, piece.width), (height, width), iter([piece])
        try:
            rows = tile_spans(height, tile, self.config.tile_overlap, align=deepest, stride=finest)
            cols = tile_spans(width, tile, self.config.tile_overlap, align=deepest, stride=finest)
        except ValueError as err:
            raise InputError(f"cannot tile a {height}x{width} model input: {err}") from None
        return (height // finest, width // finest), (height, width), self._tiles(x, rows, cols, finest)

    @torch.inference_mode()
    def _one_pass(self, x: torch.Tensor) -> Piece:
        backbone, _, reductions = self._build()
        feature_maps = backbone(x)  # Backbone.forward makes the input channels-last on every device
        h, w = feature_maps[0].shape[-2:]
        return Piece(patch_embeddings(feature_maps, reductions, self.config.patch_size), 0, 0, h, w)

    @torch.inference_mode()
    def _tiles(self, x: torch.Tensor, rows: list[TileSpan], cols: list[TileSpan], finest: int) -> Iterator[Piece]:
        backbone, _, reductions = self._build()
        for r in rows:
            for c in cols:
                maps = backbone(x[..., r.start:r.end, c.start:c.end])
                th, tw = maps[0].shape[-2:]
                features = patch_embeddings(maps, reductions, self.config.patch_size)
                grid = features.view(x.shape[0], th, tw, -1)
                top, left = r.keep_from - r.start // finest, c.keep_from - c.start // finest
                height, width = r.keep_to - r.keep_from, c.keep_to - c.keep_from
                kept = grid[:, top:top + height, left:left + width].reshape(x.shape[0], height * width, -1)
                yield Piece(kept.contiguous(), r.keep_from, c.keep_from, height, width)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, *, at_input: bool = False) -> Embedding:
        """uint8 (B, 3, H, W) -> Embedding((B, h*w, D), (h, w), (H', W')): the pieces stitched into the grid."""
        grid, input_size, pieces = self.pieces(images, at_input=at_input)
        stitched = None
        for piece in pieces:
            if piece.height == grid[0] and piece.width == grid[1]:
                return Embedding(piece.features, grid, input_size)
            if stitched is None:
                stitched = piece.features.new_empty(piece.features.shape[0], grid[0], grid[1],
                                                    piece.features.shape[-1])
            stitched[:, piece.top:piece.top + piece.height, piece.left:piece.left + piece.width] = \
                piece.features.view(-1, piece.height, piece.width, piece.features.shape[-1])
        return Embedding(stitched.flatten(1, 2), grid, input_size)
