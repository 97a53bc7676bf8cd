"""Anomaly scores and maps from nearest-neighbour distances (PATCHCORE.md section 3, paper eq. 6-7).

Array-API agnostic (array-api-compat): the library calls these with torch tensors (CPU or GPU), the torch-free
runtime (patchcore.runtime) with numpy arrays, so both score with one implementation. No torch import here
(typical_nn_distance, used by fit only, imports it when called).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from array_api_compat import array_namespace, device

from .knn import nearest


def reweighted_image_scores(queries, patch_dist, patch_idx, bank, bank_sq_norms, neighbours: int,
                            distance_scale: float):
    """Image scores s (paper eq. 7) for a batch.

    queries (B, P, D) patch features; patch_dist, patch_idx (B, P): each patch's nearest bank distance
    and index. s* = max_p patch_dist (eq. 6); m_test,* is that patch and m* its nearest bank element.
    s = (1 - exp(||m_test,* - m*|| / T) / sum_{m in N_b(m*)} exp(||m_test,* - m|| / T)) * s*

    N_b(m*) are the b nearest bank elements of m* (m* itself included, at distance 0). T is the
    bank's typical nearest-neighbour distance, fitted on training data: with raw distances in the
    tens, the softmax saturates and the weight is ~1 whatever the neighbourhood (anomalib's inert
    version). With T the weight runs from 1 - 1/b (m* sits in a dense nominal region) to 1 (m* is
    an isolated, rare nominal feature), which is the paper's intent.
    """
    xp = array_namespace(queries, patch_dist, bank)
    s_star = xp.max(patch_dist, axis=1)  # s* (eq. 6)
    if neighbours <= 1:
        return s_star
    argmax_patch = xp.argmax(patch_dist, axis=1)
    batch = xp.arange(queries.shape[0], device=device(queries))
    m_test_star = queries[batch, argmax_patch]  # (B, D)
    m_star = patch_idx[batch, argmax_patch]  # (B,)
    b = min(neighbours, bank.shape[0])
    _, support = nearest(bank[m_star], bank, b, bank_sq_norms=bank_sq_norms)  # N_b(m*), (B, b)
    diff = m_test_star[:, None, :] - bank[support]
    support_dist = xp.sqrt(xp.sum(diff * diff, axis=-1))  # (B, b)
    # The m* column: support[:, 0] is m* unless the bank has exact duplicates of it (then same distance).
    support_dist[:, 0] = s_star
    logits = support_dist / distance_scale
    logits = xp.exp(logits - xp.max(logits, axis=1, keepdims=True))  # softmax, stable
    weight = 1.0 - logits[:, 0] / xp.sum(logits, axis=1)
    return weight * s_star


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Normalised 1-D Gaussian (float64), radius round(truncate * sigma), as scipy.ndimage.gaussian_filter."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_index(size: int, radius: int) -> np.ndarray:
    """Half-sample symmetric padding indices (d c b a | a b c d | d c b a), repeated for tiny maps."""
    index = np.arange(-radius, size + radius) % (2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


def _upsampling_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: 1-D bilinear interpolation with align_corners=False (torch's F.interpolate)."""
    if n_in == n_out:
        return np.eye(n_out)
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), i1), frac)
    return matrix


@lru_cache(maxsize=64)
def map_operator(n_in: int, n_out: int, sigma: float) -> np.ndarray:
    """(n_out, n_in) float32: bilinear up-sampling from n_in to n_out, then the Gaussian (borders reflected
    as scipy's mode='reflect'), along one axis. Both steps are linear, so a whole map is A_y @ grid @ A_x^T:
    one small GEMM each side instead of an up-sampled copy and two convolutions over it."""
    matrix = _upsampling_matrix(n_in, n_out)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma)
        radius = len(kernel) // 2
        index = _reflect_index(n_out, radius)
        blurred = np.zeros_like(matrix)
        for tap, weight in enumerate(kernel):  # row i of the blur: sum_t k[t] * row reflect(i + t - r)
            blurred += weight * matrix[index[tap:tap + n_out]]
        matrix = blurred
    return matrix.astype(np.float32)


def _apply(maps, rows: np.ndarray, cols: np.ndarray):
    """(B, h, w) -> (B, H, W) = rows @ maps @ cols^T, in the array's own namespace and device, as two plain 2-D
    GEMMs (numpy runs a stacked (B, H, w) @ (w, W) product ~100x slower than the same numbers in one GEMM)."""
    xp = array_namespace(maps)
    batch, h, w = maps.shape
    height, width = rows.shape[0], cols.shape[0]
    rows = xp.asarray(rows, device=device(maps))
    cols_t = xp.asarray(np.ascontiguousarray(cols.T), device=device(maps))
    x = xp.reshape(xp.permute_dims(xp.astype(maps, xp.float32), (1, 0, 2)), (h, batch * w))
    x = rows @ x  # (H, B*w)
    x = xp.reshape(xp.permute_dims(xp.reshape(x, (height, batch, w)), (1, 0, 2)), (batch * height, w))
    return xp.astype(xp.reshape(x @ cols_t, (batch, height, width)), maps.dtype)


def gaussian_blur(maps, sigma: float):
    """(B, H, W) -> (B, H, W): separable Gaussian, borders reflected as scipy's mode='reflect'.

    Dense (H, H) and (W, W) operators: for maps of a few thousand pixels a side (anomaly_maps folds the blur
    into the much smaller up-sampling operator instead)."""
    if sigma <= 0:
        return maps
    return _apply(maps, map_operator(maps.shape[-2], maps.shape[-2], sigma),
                  map_operator(maps.shape[-1], maps.shape[-1], sigma))


def anomaly_maps(patch_dist, grid: tuple[int, int], size: tuple[int, int], sigma: float):
    """(B, h*w) patch scores -> (B, H, W) maps: bilinear up-sampling, then Gaussian smoothing."""
    maps = patch_dist.reshape((-1, *grid))
    return _apply(maps, map_operator(grid[0], size[0], float(sigma)), map_operator(grid[1], size[1], float(sigma)))


def region_patches(region, grid: tuple[int, int]):
    """(H', W') inspection region at the model input -> (h, w) bool: the patches whose centre it covers."""
    height, width = region.shape
    # float32 as the library computed it with torch, so that both paths pick the same pixels
    ys = np.minimum(((np.arange(grid[0], dtype=np.float32) + 0.5) * height / grid[0]).astype(np.int64), height - 1)
    xs = np.minimum(((np.arange(grid[1], dtype=np.float32) + 0.5) * width / grid[1]).astype(np.int64), width - 1)
    xp = array_namespace(region)
    rows = xp.asarray(ys, device=device(region))
    cols = xp.asarray(xs, device=device(region))
    return xp.astype(region[rows, :][:, cols], xp.bool)


def typical_nn_distance(bank, bank_sq_norms, *, sample: int = 1000, generator) -> float:
    """Median distance from a bank element to its nearest other element: the scale T of eq. 7 (fit only)."""
    import torch

    count = min(sample, bank.shape[0])
    if bank.shape[0] < 2:
        return 1.0
    rows = torch.randperm(bank.shape[0], generator=generator)[:count].to(bank.device)
    dist, _ = nearest(bank[rows], bank, 2, bank_sq_norms=bank_sq_norms)
    scale = float(dist[:, 1].median())
    return scale if math.isfinite(scale) and scale > 0 else 1.0
