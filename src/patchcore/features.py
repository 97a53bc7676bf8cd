"""Locally aware patch features (PATCHCORE.md section 1, paper section 3.1).

feature maps of two (or more) levels -> one d-dimensional vector per position of the finest grid.
All three steps are linear, so their order is free; we reduce channels first because it shrinks
the tensors the other two steps touch (tested equal to the paper's order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_pooling_matrix(in_channels: int, out_channels: int) -> torch.Tensor:
    """(C_in, C_out) matrix equal to adaptive average pooling over channels (the paper code's reduction)."""
    matrix = torch.zeros(in_channels, out_channels)
    for j in range(out_channels):
        start = (j * in_channels) // out_channels
        end = -((-(j + 1) * in_channels) // out_channels)  # ceil, as adaptive_avg_pool1d
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


def level_dims(channels: list[int], embedding_dim: int) -> list[int]:
    """Each level gets an equal share of d, never more than it has (no up-sampling of channels)."""
    share = embedding_dim // len(channels)
    return [min(c, share) for c in channels]


def local_aggregate(feature_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average over each position's p x p neighbourhood (zero padding, stride 1); the grid keeps its size.

    Zero padding (count_include_pad=True, as the authors' unfold and anomalib) shrinks border features
    by the share of missing neighbours, so a border patch only matches border patches. Averaging only
    the neighbours that exist measured worse on MVTec bottle (efficientnet_lite0, coreset 1%):
    pixel AUROC 0.9766 vs 0.9788, AUPRO 0.905 vs 0.915.
    """
    if patch_size == 1:
        return feature_map
    return F.avg_pool2d(feature_map, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)


def patch_embeddings(feature_maps: list[torch.Tensor], pooling: list[torch.Tensor | None], patch_size: int) -> torch.Tensor:
    """[(B, C_j, H_j, W_j)] -> (B, H_0 * W_0, D), D = sum of pooled level widths.

    Levels after the first are rescaled bilinearly to the first (finest) grid, then all are
    concatenated per position.
    """
    height, width = feature_maps[0].shape[-2:]
    levels = []
    for feature_map, matrix in zip(feature_maps, pooling):
        if matrix is not None:  # channel reduction: (B, C, H, W) x (C, e) -> (B, e, H, W)
            feature_map = torch.einsum("bchw,ce->behw", feature_map, matrix.to(feature_map))
        feature_map = local_aggregate(feature_map, patch_size)
        if feature_map.shape[-2:] != (height, width):
            feature_map = F.interpolate(feature_map, size=(height, width), mode="bilinear", align_corners=False)
        levels.append(feature_map)
    embedding = torch.cat(levels, dim=1)  # (B, D, H, W)
    return embedding.flatten(2).transpose(1, 2).contiguous()
