"""Greedy k-center coreset (PATCHCORE.md section 2) against the plain O(N^2) algorithm."""
from __future__ import annotations

import itertools
import time

import pytest
import torch

from patchcore.core.coreset import (coreset_count, coverage_radius, greedy_coreset, greedy_coreset_reference,
                               random_projection)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed))


def clustered(n: int, d: int, seed: int, clusters: int = 20) -> torch.Tensor:
    """Clusters of very unequal sizes and spreads; continuous noise keeps every point distinct."""
    gen = _gen(seed)
    centres = torch.randn(clusters, d, generator=gen) * 10.0
    weights = torch.linspace(1.0, 30.0, clusters) ** 2  # a few big clusters, many small ones
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    spread = torch.rand(clusters, 1, generator=gen) * 0.9 + 0.1
    return centres[labels] + torch.randn(n, d, generator=gen) * spread[labels]


def low_dimensional(n: int, d: int, seed: int) -> torch.Tensor:
    """A 2-D manifold (a twisted sheet) embedded in d dimensions."""
    gen = _gen(seed)
    uv = torch.rand(n, 2, generator=gen) * 4.0
    curve = torch.stack([uv[:, 0], uv[:, 1], torch.sin(uv[:, 0]) * uv[:, 1], torch.cos(2 * uv[:, 1])], 1)
    return curve @ torch.randn(4, d, generator=gen)


def integer_grid(side: int) -> torch.Tensor:
    """side x side integer points in the plane: squared distances are exact integers, full of ties."""
    axis = torch.arange(side, dtype=torch.float32)
    return torch.cartesian_prod(axis, axis)


DATASETS = {
    # name: (features, coreset size). N^2 * d stays <= ~4e7 floats for the O(N^2) reference.
    "gaussian-500": (lambda: gaussian(500, 16, 1), 50),
    "gaussian-1500": (lambda: gaussian(1500, 16, 2), 100),
    "clustered-2000": (lambda: clustered(2000, 8, 3), 200),
    "clustered-3000": (lambda: clustered(3000, 4, 4), 150),
    "low-dim-1000": (lambda: low_dimensional(1000, 32, 5), 150),
    "far-from-origin-800": (lambda: gaussian(800, 16, 6) + 300.0, 80),  # large norms, small gaps
    # Exact ties everywhere: the first index must win, as in the plain algorithm.
    "integer-grid-with-duplicates-800": (lambda: integer_grid(20).repeat(2, 1), 60),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("seed", [0, 7])
def test_greedy_equals_reference(name, seed):
    make, n = DATASETS[name]
    features = make()
    fast = greedy_coreset(features, n, generator=_gen(seed))
    slow = greedy_coreset_reference(features, n, generator=_gen(seed))
    assert fast.dtype == torch.long and fast.shape == (n,)
    assert torch.equal(fast, slow)
    assert len(set(fast.tolist())) == n  # distinct points: no element is picked twice


def test_greedy_picks_the_farthest_point_each_step():
    # Contract, independent of the reference: each new centre maximises the distance to the earlier ones.
    features = clustered(800, 6, 11)
    selected = greedy_coreset(features, 40, generator=_gen(3))
    for k in range(1, 40):
        dist = torch.cdist(features.double(), features[selected[:k]].double()).min(1).values
        assert dist[selected[k]] == pytest.approx(float(dist.max()), rel=1e-6)


def test_same_seed_same_indices_different_seed_different_start():
    features = gaussian(1000, 8, 21)
    a = greedy_coreset(features, 60, generator=_gen(0))
    b = greedy_coreset(features, 60, generator=_gen(0))
    c = greedy_coreset(features, 60, generator=_gen(1))
    assert torch.equal(a, b)
    assert a[0] != c[0]  # seeds 0 and 1 draw different first centres for N=1000
    assert not torch.equal(a, c)


def test_coreset_covers_better_than_random_subsets():
    features = clustered(2000, 8, 31)
    n = 100
    greedy = coverage_radius(features, greedy_coreset(features, n, generator=_gen(0)))
    gen = _gen(99)
    random_radii = [coverage_radius(features, torch.randperm(2000, generator=gen)[:n]) for _ in range(5)]
    assert greedy < min(random_radii)


def test_coverage_radius_matches_brute_force():
    features = gaussian(300, 5, 41)
    selected = torch.tensor([3, 50, 120, 299])
    expected = torch.cdist(features.double(), features[selected].double()).min(1).values.max()
    assert coverage_radius(features, selected, chunk=7) == pytest.approx(float(expected), rel=1e-5)


def test_radius_non_increasing_and_prefixes_agree():
    features = low_dimensional(2000, 16, 51)
    full = greedy_coreset(features, 200, generator=_gen(5))
    radii = []
    for n in (1, 2, 5, 10, 25, 50, 100, 200):
        sel = greedy_coreset(features, n, generator=_gen(5))
        assert torch.equal(sel, full[:n])  # greedy: a smaller coreset is a prefix of a larger one
        radii.append(coverage_radius(features, sel))
    assert all(later <= earlier for earlier, later in zip(radii, radii[1:]))
    assert radii[-1] < radii[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_approximation_against_exact_optimum(seed):
    # Gonzalez's greedy is within 2x of the optimal minimax radius; brute-force the optimum on 14 points.
    features = clustered(14, 2, seed, clusters=4)
    n = 3
    greedy = coverage_radius(features, greedy_coreset(features, n, generator=_gen(seed)))
    optimum = min(coverage_radius(features, torch.tensor(c)) for c in itertools.combinations(range(14), n))
    assert optimum <= greedy <= 2.0 * optimum + 1e-6


def test_never_builds_an_n_by_n_matrix():
    # N = 200k: an N x N float32 matrix would need 160 GB; the O(N) version takes well under a second.
    total, d, n = 200_000, 8, 3
    features = torch.randn(total, d, generator=_gen(61))
    start = time.perf_counter()
    selected = greedy_coreset(features, n, generator=_gen(62))
    elapsed = time.perf_counter() - start
    # Oracle: the plain greedy with one O(N) distance vector.
    first = int(torch.randint(total, (1,), generator=_gen(62)).item())
    expected = [first]
    nearest = (features - features[first]).pow(2).sum(1)
    for _ in range(1, n):
        expected.append(int(torch.argmax(nearest)))
        nearest = torch.minimum(nearest, (features - features[expected[-1]]).pow(2).sum(1))
    assert selected.tolist() == expected
    assert elapsed < 10.0


def test_invalid_size_raises():
    features = gaussian(10, 2, 0)
    for n in (0, 11, -1):
        with pytest.raises(ValueError, match="coreset size"):
            greedy_coreset(features, n, generator=_gen(0))


def test_coreset_count_ratio_size_and_clipping():
    assert coreset_count(1000, 0.1) == 100
    assert coreset_count(1000, 0.01) == 10
    assert coreset_count(1000, 0.25) == 250
    assert coreset_count(1000, 0.123) == 123
    assert coreset_count(1000, 0.1, size=37) == 37  # an explicit size overrides the ratio
    assert coreset_count(1000, 0.0001) == 1  # never empty
    assert coreset_count(50, 0.1, size=500) == 50  # never more than there is
    assert coreset_count(50, 1.0) == 50


def test_random_projection_is_seeded_and_keeps_distances_on_average():
    a = random_projection(256, 128, _gen(3))
    assert a.shape == (256, 128)
    assert torch.equal(a, random_projection(256, 128, _gen(3)))
    assert not torch.equal(a, random_projection(256, 128, _gen(4)))
    x = torch.randn(200, 256, generator=_gen(5))
    ratio = torch.pdist(x @ a) / torch.pdist(x)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.05)  # Johnson-Lindenstrauss
