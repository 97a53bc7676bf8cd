"""Anomaly scores and maps from nearest-neighbour distances (PATCHCORE.md section 3, paper eq. 6-7)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .knn import nearest


def reweighted_image_scores(queries: torch.Tensor, patch_dist: torch.Tensor, patch_idx: torch.Tensor,
                            bank: torch.Tensor, bank_sq_norms: torch.Tensor, neighbours: int,
                            distance_scale: float) -> torch.Tensor:
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
    s_star, argmax_patch = patch_dist.max(1)  # s* (eq. 6)
    if neighbours <= 1:
        return s_star
    batch = torch.arange(queries.shape[0], device=queries.device)
    m_test_star = queries[batch, argmax_patch]  # (B, D)
    m_star = patch_idx[batch, argmax_patch]  # (B,)
    b = min(neighbours, bank.shape[0])
    _, support = nearest(bank[m_star], bank, b, bank_sq_norms=bank_sq_norms)  # N_b(m*), (B, b)
    support_dist = (m_test_star[:, None, :] - bank[support]).pow(2).sum(-1).sqrt()  # (B, b)
    # The m* column: support[:, 0] is m* unless the bank has exact duplicates of it (then same distance).
    support_dist[:, 0] = s_star
    weight = 1.0 - torch.softmax(support_dist / distance_scale, dim=1)[:, 0]
    return weight * s_star


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius round(truncate * sigma), as scipy.ndimage.gaussian_filter."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) -> (B, H, W): separable Gaussian, borders reflected as scipy's mode='reflect'."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma).to(maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    for dim in (-1, -2):
        x = _reflect_pad(x, radius, dim)
        weight = kernel.view(1, 1, 1, -1) if dim == -1 else kernel.view(1, 1, -1, 1)
        x = _conv_in_strips(x, weight, dim)
    return x[:, 0]


# A convolution may unfold its input (one copy per kernel tap: 33 for sigma 4); past this many output
# elements it runs in strips, each output line computed as before (lines along the kernel are independent).
STRIP_ELEMENTS = 1 << 22


def _conv_in_strips(x: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """F.conv2d(x, weight) for a 1-D kernel along `dim`, in strips across the other axis when large."""
    taps = weight.shape[dim]
    out_shape = list(x.shape)
    out_shape[dim] -= taps - 1
    total = out_shape[0] * out_shape[2] * out_shape[3]
    if total <= STRIP_ELEMENTS:
        return F.conv2d(x, weight)
    across = -2 if dim == -1 else -1  # strips of rows for a horizontal kernel, of columns for a vertical one
    step = max(1, STRIP_ELEMENTS // (total // x.shape[across]))
    out = x.new_empty(out_shape)
    for start in range(0, x.shape[across], step):
        part = x.narrow(across, start, min(step, x.shape[across] - start))
        out.narrow(across, start, part.shape[across]).copy_(F.conv2d(part, weight))
    return out


def _reflect_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding (d c b a | a b c d | d c b a), repeated for tiny maps."""
    size = x.shape[dim]
    index = torch.arange(-radius, size + radius, device=x.device)
    period = 2 * size
    index = index % period
    index = torch.where(index >= size, period - 1 - index, index)
    return x.index_select(dim % x.ndim, index)


def anomaly_maps(patch_dist: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h*w) patch scores -> (B, H, W) maps: bilinear up-sampling, then Gaussian smoothing."""
    maps = patch_dist.view(-1, 1, *grid)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(maps, sigma)


def typical_nn_distance(bank: torch.Tensor, bank_sq_norms: torch.Tensor, *, sample: int = 1000,
                        generator: torch.Generator) -> float:
    """Median distance from a bank element to its nearest other element: the scale T of eq. 7."""
    count = min(sample, bank.shape[0])
    if bank.shape[0] < 2:
        return 1.0
    rows = torch.randperm(bank.shape[0], generator=generator)[:count].to(bank.device)
    dist, _ = nearest(bank[rows], bank, 2, bank_sq_norms=bank_sq_norms)
    scale = float(dist[:, 1].median())
    return scale if math.isfinite(scale) and scale > 0 else 1.0
