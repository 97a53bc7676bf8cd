"""Scores and maps (PATCHCORE.md section 3): blur vs scipy, eq. 7 by hand, and what reweighting is for."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from patchcore.core.knn import nearest, squared_norms
from patchcore.core.scoring import (
    anomaly_maps,
    gaussian_blur,
    gaussian_kernel1d,
    reweighted_image_scores,
    typical_nn_distance,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scipy_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.from_numpy(np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0)
                                      for m in maps.double().numpy()]))


# ---------------------------------------------------------------- Gaussian smoothing

@pytest.mark.parametrize("shape, sigma", [
    ((2, 40, 50), 4.0),
    ((1, 5, 5), 4.0),  # radius 16 > size 5: the reflection has to repeat
    ((1, 3, 17), 4.0),
    ((1, 1, 1), 4.0),
    ((2, 23, 11), 2.5),
    ((1, 12, 9), 1.0),
])
def test_gaussian_blur_matches_scipy_reflect(shape, sigma):
    maps = torch.rand(*shape, generator=_gen(sum(shape)))
    out = gaussian_blur(maps, sigma)
    assert out.shape == maps.shape and out.dtype == maps.dtype
    torch.testing.assert_close(out.double(), _scipy_blur(maps, sigma), rtol=1e-5, atol=1e-5)


def test_gaussian_blur_sigma_zero_is_identity():
    maps = torch.rand(1, 4, 4, generator=_gen(0))
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0, 7.3])
def test_gaussian_kernel1d(sigma):
    kernel = gaussian_kernel1d(sigma)
    radius = int(4 * sigma + 0.5)
    assert kernel.shape == (2 * radius + 1,)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(kernel, kernel[::-1])
    # Oracle: scipy's impulse response (a delta far from any border).
    delta = np.zeros(4 * radius + 3)
    delta[2 * radius + 1] = 1.0
    response = gaussian_filter1d(delta, sigma, mode="constant", truncate=4.0)[radius + 1:3 * radius + 2]
    np.testing.assert_allclose(kernel, response, rtol=1e-6, atol=1e-8)


def test_anomaly_maps_bilinear_then_blur():
    grid, size = (7, 7), (56, 56)
    patch_dist = torch.rand(3, grid[0] * grid[1], generator=_gen(1))
    maps = anomaly_maps(patch_dist, grid, size, sigma=4.0)
    assert maps.shape == (3, *size)
    upsampled = F.interpolate(patch_dist.view(3, 1, *grid), size=size, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(maps.double(), _scipy_blur(upsampled, 4.0), rtol=1e-5, atol=1e-5)


def test_anomaly_maps_upsampling_is_bilinear_not_nearest():
    grid, size = (4, 6), (32, 48)
    patch_dist = torch.rand(1, 24, generator=_gen(2))
    maps = anomaly_maps(patch_dist, grid, size, sigma=0.0)
    bilinear = F.interpolate(patch_dist.view(1, 1, *grid), size=size, mode="bilinear", align_corners=False)[:, 0]
    nearest_mode = F.interpolate(patch_dist.view(1, 1, *grid), size=size, mode="nearest")[:, 0]
    torch.testing.assert_close(maps, bilinear)
    assert not torch.allclose(maps, nearest_mode)


# ---------------------------------------------------------------- eq. 7 by hand

# Bank of three points in 2-D.
BANK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
# Image 0: patches (0.1, 0.1) -> m0 at sqrt(0.02), and (3, 0) -> m1 at 2: s* = 2, m_test,* = (3, 0), m* = m1.
# Image 1: patches (0, 2.5) -> m2 at 0.5, and (-0.3, 0) -> m0 at 0.3: s* = 0.5, m_test,* = (0, 2.5), m* = m2.
QUERIES = torch.tensor([[[0.1, 0.1], [3.0, 0.0]], [[0.0, 2.5], [-0.3, 0.0]]])
PATCH_DIST = torch.tensor([[math.sqrt(0.02), 2.0], [0.5, 0.3]])
PATCH_IDX = torch.tensor([[0, 1], [2, 0]])


def _eq7(s_star, support_distances, scale):
    """(1 - exp(||m_test,* - m*|| / T) / sum_{m in N_b(m*)} exp(||m_test,* - m|| / T)) * s*."""
    return (1.0 - math.exp(support_distances[0] / scale) / sum(math.exp(d / scale) for d in support_distances)) * s_star


@pytest.mark.parametrize("b, scale, expected", [
    # N_3(m1) = {m1, m0, m2}; distances from (3, 0): 2, 3, sqrt(13).
    # N_3(m2) = {m2, m0, m1}; distances from (0, 2.5): 0.5, 2.5, sqrt(7.25).
    (3, 1.0, [(1 - math.exp(2) / (math.exp(2) + math.exp(3) + math.exp(math.sqrt(13)))) * 2.0,
              (1 - math.exp(0.5) / (math.exp(0.5) + math.exp(2.5) + math.exp(math.sqrt(7.25)))) * 0.5]),
    # N_2(m1) = {m1, m0} (m0 at 1 < m2 at sqrt 5); N_2(m2) = {m2, m0} (m0 at 2 < m1 at sqrt 5).
    (2, 1.0, [(1 - math.exp(2) / (math.exp(2) + math.exp(3))) * 2.0,
              (1 - math.exp(0.5) / (math.exp(0.5) + math.exp(2.5))) * 0.5]),
    (3, 0.5, [_eq7(2.0, [2.0, 3.0, math.sqrt(13)], 0.5), _eq7(0.5, [0.5, 2.5, math.sqrt(7.25)], 0.5)]),
    (9, 1.0, [_eq7(2.0, [2.0, 3.0, math.sqrt(13)], 1.0), _eq7(0.5, [0.5, 2.5, math.sqrt(7.25)], 1.0)]),  # b > bank
])
def test_eq7_hand_computed_three_point_bank(b, scale, expected):
    scores = reweighted_image_scores(QUERIES, PATCH_DIST, PATCH_IDX, BANK, squared_norms(BANK), b, scale)
    assert scores.shape == (2,)
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)


def test_eq7_hand_example_patch_inputs_are_the_true_nearest():
    # Guard on the hand-written PATCH_DIST / PATCH_IDX above.
    dist, idx = nearest(QUERIES.reshape(-1, 2), BANK, 1)
    assert idx[:, 0].view(2, 2).tolist() == PATCH_IDX.tolist()
    torch.testing.assert_close(dist[:, 0].view(2, 2), PATCH_DIST)


@pytest.mark.parametrize("b", [0, 1])
def test_no_reweighting_returns_s_star(b):
    scores = reweighted_image_scores(QUERIES, PATCH_DIST, PATCH_IDX, BANK, squared_norms(BANK), b, 1.0)
    assert scores.tolist() == pytest.approx([2.0, 0.5])


# ---------------------------------------------------------------- what reweighting is for

def _dense_and_rare_bank(scale: float = 1.0) -> torch.Tensor:
    """A dense 11 x 11 grid (spacing 0.1) in the plane z = 0, and one isolated point at (5, 5, 0)."""
    axis = torch.arange(-5, 6) * 0.1
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    dense = torch.cat([grid, torch.zeros(len(grid), 1)], 1)
    return torch.cat([dense, torch.tensor([[5.0, 5.0, 0.0]])]) * scale


def _two_images(scale: float = 1.0) -> torch.Tensor:
    # A: worst patch 0.102 above the dense grid's centre. B: worst patch 0.1 above the rare point.
    a = [[0.0, 0.0, 0.102], [0.31, 0.22, 0.01]]
    b = [[5.0, 5.0, 0.1], [0.12, -0.19, 0.02]]
    return torch.tensor([a, b]) * scale


def _scores(bank, queries, neighbours, distance_scale):
    dist, idx = nearest(queries.reshape(-1, queries.shape[-1]), bank, 1)
    patch_dist, patch_idx = dist[:, 0].view(queries.shape[:2]), idx[:, 0].view(queries.shape[:2])
    return reweighted_image_scores(queries, patch_dist, patch_idx, bank, squared_norms(bank), neighbours,
                                   distance_scale), patch_dist.max(1).values, patch_idx


def test_reweighting_ranks_the_rare_neighbourhood_higher():
    bank, queries = _dense_and_rare_bank(), _two_images()
    scale = typical_nn_distance(bank, squared_norms(bank), sample=len(bank), generator=_gen(0))
    assert scale == pytest.approx(0.1, rel=1e-5)  # grid spacing: the median nearest-other distance
    _, s_star, patch_idx = _scores(bank, queries, 0, scale)
    assert s_star[0] > s_star[1]  # s*_A = 0.102 > s*_B = 0.1
    assert patch_idx[0, 0] != len(bank) - 1 and patch_idx[1, 0] == len(bank) - 1  # A dense, B rare
    for off in (0, 1):
        plain, _, _ = _scores(bank, queries, off, scale)
        assert plain[0] > plain[1]
    reweighted, _, _ = _scores(bank, queries, 9, scale)
    assert reweighted[1] > reweighted[0]  # the rare neighbourhood wins
    assert float(reweighted[1] / s_star[1]) == pytest.approx(1.0, abs=1e-4)  # isolated m*: weight ~1
    assert float(reweighted[0] / s_star[0]) < 0.95  # dense m*: weight pulled towards 1 - 1/b


def test_reweighting_with_the_bank_scale_is_scale_free():
    bank, queries = _dense_and_rare_bank(), _two_images()
    small, _, _ = _scores(bank, queries, 9, 0.1)
    large, _, _ = _scores(bank * 100, queries * 100, 9, 10.0)
    torch.testing.assert_close(large, small * 100, rtol=1e-4, atol=1e-4)


def test_raw_distance_softmax_is_inert():
    # anomalib's version: the softmax over raw distances (T = 1) with distances in the tens saturates.
    bank, queries = _dense_and_rare_bank(100.0), _two_images(100.0)
    raw, s_star, _ = _scores(bank, queries, 9, 1.0)
    weights = raw / s_star
    assert bool((weights > 0.999).all())
    assert raw[0] > raw[1]  # the ranking of s* is unchanged: reweighting did nothing


@pytest.mark.parametrize("b", [2, 3, 9])
def test_weights_lie_between_one_minus_one_over_b_and_one(b):
    gen = _gen(b)
    bank = torch.randn(200, 6, generator=gen)
    queries = torch.randn(16, 10, 6, generator=gen) * 1.5
    for distance_scale in (0.05, 0.5, 1.0, 20.0):
        scores, s_star, _ = _scores(bank, queries, b, distance_scale)
        weights = scores / s_star
        assert bool((weights >= 1.0 - 1.0 / b - 1e-6).all()) and bool((weights <= 1.0 + 1e-6).all())
    # With a huge T every neighbour counts the same: the weight is exactly 1 - 1/b.
    scores, s_star, _ = _scores(bank, queries, b, 1e9)
    torch.testing.assert_close(scores / s_star, torch.full((16,), 1.0 - 1.0 / b), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the scale T

@pytest.mark.parametrize("size, sample", [(101, 101), (101, 500), (57, 1000)])
def test_typical_nn_distance_is_the_median_nearest_other_distance(size, sample):
    bank = torch.randn(size, 5, generator=_gen(size))
    pairwise = torch.cdist(bank.double(), bank.double())
    pairwise.fill_diagonal_(float("inf"))
    expected = float(np.median(pairwise.min(1).values.numpy()))  # odd sizes: the median is one element
    got = typical_nn_distance(bank, squared_norms(bank), sample=sample, generator=_gen(1))
    assert got == pytest.approx(expected, rel=1e-5)


def test_typical_nn_distance_degenerate_banks_fall_back_to_one():
    assert typical_nn_distance(torch.zeros(1, 3), torch.zeros(1), generator=_gen(0)) == 1.0
    dup = torch.ones(5, 3)  # all duplicates: median distance 0 is no scale
    assert typical_nn_distance(dup, squared_norms(dup), generator=_gen(0)) == 1.0


def test_maps_agree_between_torch_and_numpy():
    """One implementation for the library (torch) and the torch-free runtime (numpy): the same maps and
    eq. 7 scores from either array type."""
    grid, size = (9, 13), (75, 101)
    patch_dist = torch.rand(2, grid[0] * grid[1], generator=_gen(5))
    from_torch = anomaly_maps(patch_dist, grid, size, 4.0)
    from_numpy = anomaly_maps(patch_dist.numpy(), grid, size, 4.0)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    np.testing.assert_allclose(from_numpy, from_torch.numpy(), rtol=1e-6, atol=1e-6)
    scores = reweighted_image_scores(QUERIES.numpy(), PATCH_DIST.numpy(), PATCH_IDX.numpy(), BANK.numpy(),
                                     squared_norms(BANK.numpy()), 3, 0.7)
    np.testing.assert_allclose(scores, reweighted_image_scores(QUERIES, PATCH_DIST, PATCH_IDX, BANK,
                                                               squared_norms(BANK), 3, 0.7).numpy(), rtol=1e-6)


def test_large_upsampling_folds_the_blur_into_the_operator():
    """anomaly_maps never builds the up-sampled map before blurring: against the two-step reference on a
    map large enough to show a difference in placement or borders."""
    grid, size = (21, 34), (168, 272)
    patch_dist = torch.rand(1, grid[0] * grid[1], generator=_gen(6))
    upsampled = F.interpolate(patch_dist.view(1, 1, *grid), size=size, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(anomaly_maps(patch_dist, grid, size, 4.0).double(), _scipy_blur(upsampled, 4.0),
                               rtol=1e-5, atol=1e-5)
