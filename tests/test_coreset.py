"""Greedy k-center coreset (PATCHCORE.md section 2) against the plain O(N^2) algorithm."""
from __future__ import annotations

import itertools

import pytest
import torch

from patchcore.core import coreset
from patchcore.core.coreset import (
    coreset_count,
    coverage_radius,
    greedy_coreset,
    greedy_coreset_reference,
    random_projection,
)


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
    assert a[0] != c[0]  # seeds 0 and 1 draw different first centres for N=1000 (so a != c)


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
    # N = 200k: an N x N float32 matrix would need 160 GB.
    total, d, n = 200_000, 8, 3
    features = torch.randn(total, d, generator=_gen(61))
    selected = greedy_coreset(features, n, generator=_gen(62))
    # Oracle: the plain greedy with one O(N) distance vector.
    first = int(torch.randint(total, (1,), generator=_gen(62)).item())
    expected = [first]
    nearest = (features - features[first]).pow(2).sum(1)
    for _ in range(1, n):
        expected.append(int(torch.argmax(nearest)))
        nearest = torch.minimum(nearest, (features - features[expected[-1]]).pow(2).sum(1))
    assert selected.tolist() == expected


def bulk_and_outliers(n: int, d: int, seed: int, outlier_share: float = 0.03) -> torch.Tensor:
    """A compact bulk N(0, 0.2^2 I) of nominal patches plus scattered N(0, I) outliers, shuffled."""
    gen = _gen(seed)
    x = torch.randn(n, d, generator=gen) * 0.2
    outliers = int(round(outlier_share * n))
    x[:outliers] = torch.randn(outliers, d, generator=gen)
    return x[torch.randperm(n, generator=gen)]


def _first_pick_is_outlier_seed(features: torch.Tensor) -> int:
    """A seed whose random first centre is an outlier: the case where the per-element test prunes nothing."""
    norms = (features - features.mean(0)).norm(dim=1)
    threshold = 2.0 * float(norms.median())
    for seed in range(10_000):
        if norms[int(torch.randint(features.shape[0], (1,), generator=_gen(seed)))] > threshold:
            return seed
    raise AssertionError("no such seed")


LAZY_CASES = {
    # name: (features, coreset size). Small hot sets, so that rebuilds and refreshes run many times.
    "bulk-and-outliers": (lambda: bulk_and_outliers(1200, 16, 71), 120),
    "bulk-and-outliers-far-from-origin": (lambda: bulk_and_outliers(1000, 16, 72) + 1e4, 80),
    "gaussian-far-from-origin": (lambda: gaussian(800, 16, 73) + 1e4, 80),
    # Many identical rows: exact ties among values, thresholds and centres.
    "exact-duplicates": (lambda: gaussian(60, 8, 74).repeat(20, 1)[torch.randperm(1200, generator=_gen(75))], 90),
    "duplicates-more-centres-than-distinct-rows": (lambda: gaussian(40, 4, 76).repeat(10, 1), 60),
    "integer-grid-with-duplicates": (lambda: integer_grid(15).repeat(3, 1), 80),
    "clustered": (lambda: clustered(1000, 8, 77), 120),
}


@pytest.fixture
def always_grouped(monkeypatch):
    """Group the hot set as soon as the per-element test has run once, at any size (numpy backend)."""
    monkeypatch.setattr(coreset, "_GROUP_MIN_HOT", 0)
    monkeypatch.setattr(coreset, "_GROUP_SHARE", 2.0)


@pytest.mark.parametrize("name", sorted(LAZY_CASES))
@pytest.mark.parametrize("hot_size", [1, 16, 4096])
def test_lazy_greedy_equals_reference(name, hot_size):
    make, n = LAZY_CASES[name]
    features = make()
    seeds = [0, _first_pick_is_outlier_seed(features)] if name.startswith("bulk") else [0, 5]
    for seed in seeds:
        expected = greedy_coreset_reference(features, n, generator=_gen(seed))
        for backend in ("numpy", "torch"):
            fast = greedy_coreset(features, n, generator=_gen(seed), backend=backend, hot_size=hot_size)
            assert torch.equal(fast, expected), (seed, backend)


@pytest.mark.parametrize("name", sorted(LAZY_CASES))
@pytest.mark.parametrize("hot_size", [1, 4096])
def test_grouped_update_equals_reference(name, hot_size, always_grouped):
    # Groups by nearest centre (skipped whole by the triangle test, low-dimensional bounds on the gaps and on
    # the members' distances, argmax over group maxima): the same selection, ties included.
    make, n = LAZY_CASES[name]
    features = make()
    seeds = [0, _first_pick_is_outlier_seed(features)] if name.startswith("bulk") else [0, 5]
    for seed in seeds:
        stats = {}
        fast = greedy_coreset(features, n, generator=_gen(seed), backend="numpy", hot_size=hot_size, stats=stats)
        assert torch.equal(fast, greedy_coreset_reference(features, n, generator=_gen(seed))), seed
        assert stats["group_builds"] >= 1


def test_grouped_update_on_all_datasets(always_grouped):
    for name, (make, n) in sorted(DATASETS.items()):
        features = make()
        stats = {}
        fast = greedy_coreset(features, n, generator=_gen(3), backend="numpy", stats=stats)
        assert torch.equal(fast, greedy_coreset_reference(features, n, generator=_gen(3))), name
        assert stats["group_builds"] >= 1, name


SLOT_CASES = {
    # name: (features, coreset size): cases that stay grouped for most steps (the cases above drop the groups).
    "sheet": (lambda: low_dimensional(1500, 16, 5), 200),
    "integer-grid-with-duplicates": (lambda: integer_grid(30).repeat(2, 1), 150),
    "clustered": (lambda: clustered(1500, 8, 78), 200),
}


@pytest.mark.parametrize("name", sorted(SLOT_CASES))
@pytest.mark.parametrize("hot_size", [16, 4096])
def test_grouped_slots_dropped_when_full_equal_reference(name, hot_size, always_grouped, monkeypatch):
    # The grouped step reads members from slots contiguous by group; a moved element leaves a stale slot,
    # the newest group is appended, and the stale slots are dropped when the spare runs out. One spare slot:
    # dropped at almost every step where something moves. Same selection, ties included.
    monkeypatch.setattr(coreset, "_SLOT_SPARE", 1)
    monkeypatch.setattr(coreset, "_SLOT_SPARE_SHARE", 0.0)
    make, n = SLOT_CASES[name]
    features = make()
    for seed in (0, 5):
        stats = {}
        fast = greedy_coreset(features, n, generator=_gen(seed), backend="numpy", hot_size=hot_size, stats=stats)
        assert torch.equal(fast, greedy_coreset_reference(features, n, generator=_gen(seed))), seed
        assert stats["slots"] > 0 and stats["slot_fills"] > stats["group_builds"] + 50, stats


def test_grouped_slots_read_the_reached_groups_only(always_grouped, monkeypatch):
    # The slots read per step are those of the reached groups (their members plus stale slots, which the
    # default spare keeps below half again as many), not the hot set; the same selection as the ungrouped run.
    features = low_dimensional(20_000, 32, 5)
    n = 600
    stats = {}
    selected = greedy_coreset(features, n, generator=_gen(4), backend="numpy", hot_size=20_000, stats=stats)
    monkeypatch.setattr(coreset, "_GROUP_SHARE", -1.0)  # never grouped
    plain = {}
    assert torch.equal(selected, greedy_coreset(features, n, generator=_gen(4), backend="numpy", hot_size=20_000,
                                                stats=plain))
    assert plain["slots"] == 0 and stats["slots"] > 0
    assert stats["members"] <= stats["slots"] < 2 * stats["members"] + 20_000, stats
    assert stats["slots"] < 0.05 * stats["hot_total"], stats


def test_grouped_hot_set_of_most_of_n_becomes_all_of_n(always_grouped):
    # Grouped, with a hot set of over half of N: the next rebuild makes all of N hot (no stale elements left
    # to refresh, no rebuild after it). Still the farthest point at every step, first index on ties.
    features = low_dimensional(6000, 32, 5)
    n, hot_size = 600, 3500
    stats = {}
    selected = greedy_coreset(features, n, generator=_gen(4), backend="numpy", hot_size=hot_size, stats=stats)
    assert stats["group_builds"] >= 1
    assert stats["hot_total"] > hot_size * stats["steps"], stats  # the later steps ran on all 6000
    nearest = (features - features[selected[0]]).pow(2).sum(1)
    for k in range(1, n):
        assert int(selected[k]) == int(nearest.numpy().argmax())
        nearest = torch.minimum(nearest, (features - features[selected[k]]).pow(2).sum(1))


def test_grouped_update_skips_most_of_the_hot_set(monkeypatch):
    # A 2-D sheet: each new centre can reach only nearby groups, so the grouped steps test a small share of
    # the hot set, and the low-dimensional bound leaves fewer direct distances than the per-element test.
    features = low_dimensional(20_000, 32, 5)
    n = 600
    plain = {}
    monkeypatch.setattr(coreset, "_LOW_MIN_HOT", 1 << 40)  # the per-element triangle test alone
    expected = greedy_coreset(features, n, generator=_gen(4), backend="numpy", hot_size=20_000, stats=plain)
    assert plain["group_builds"] == 0  # the default thresholds: a hot set this small is not grouped
    monkeypatch.setattr(coreset, "_GROUP_MIN_HOT", 0)
    monkeypatch.setattr(coreset, "_GROUP_SHARE", 2.0)
    stats = {}
    selected = greedy_coreset(features, n, generator=_gen(4), backend="numpy", hot_size=20_000, stats=stats)
    assert torch.equal(selected, expected)
    assert stats["group_builds"] >= 1 and stats["steps"] == n - 1
    assert stats["members"] < 0.05 * stats["hot_total"], stats
    assert stats["distances"] < plain["distances"], (stats, plain)
    nearest = (features - features[selected[0]]).pow(2).sum(1)
    for k in range(1, n):
        assert int(selected[k]) == int(nearest.numpy().argmax())
        nearest = torch.minimum(nearest, (features - features[selected[k]]).pow(2).sum(1))


@pytest.fixture
def low_bounds(monkeypatch):
    """Low-dimensional bounds (per hot element, and in the refresh) from the first hot set on, at any size; the
    refresh takes direct distances for every pair its q-dimensional bound leaves (never the d-dimensional bound)."""
    monkeypatch.setattr(coreset, "_LOW_MIN_HOT", 0)
    monkeypatch.setattr(coreset, "_LOW_MIN_STEPS", 0)
    monkeypatch.setattr(coreset, "_DENSE_PAIRS", 1 << 40)


@pytest.mark.parametrize("name", sorted(LAZY_CASES))
@pytest.mark.parametrize("hot_size", [1, 16, 4096])
def test_low_dimensional_bounds_equal_reference(name, hot_size, low_bounds):
    # The per-element bound in the principal directions after the triangle test, and the refresh's GEMM lower
    # bound in those directions: the same selection, ties included, on both backends.
    make, n = LAZY_CASES[name]
    features = make()
    seeds = [0, _first_pick_is_outlier_seed(features)] if name.startswith("bulk") else [0, 5]
    for seed in seeds:
        expected = greedy_coreset_reference(features, n, generator=_gen(seed))
        for backend in ("numpy", "torch"):
            stats = {}
            fast = greedy_coreset(features, n, generator=_gen(seed), backend=backend, hot_size=hot_size, stats=stats)
            assert torch.equal(fast, expected), (seed, backend)
            assert stats["low_bounds"] > 0, (seed, backend)  # the path ran
            if hot_size < n:  # rebuilt after the first hot set: the refresh took its bound in q dimensions
                assert stats["low_pairs"] > 0 and stats["bound_pairs"] == 0, stats


@pytest.mark.parametrize("name", sorted(LAZY_CASES))
def test_refresh_dense_blocks_take_the_full_bound(name, low_bounds, monkeypatch):
    # Every refresh block goes on from the q-dimensional bound to the d-dimensional one (as where the first
    # leaves many pairs): the same selection on both backends.
    monkeypatch.setattr(coreset, "_DENSE_PAIRS", -1)
    make, n = LAZY_CASES[name]
    features = make()
    expected = greedy_coreset_reference(features, n, generator=_gen(2))
    for backend in ("numpy", "torch"):
        stats = {}
        fast = greedy_coreset(features, n, generator=_gen(2), backend=backend, hot_size=16, stats=stats)
        assert torch.equal(fast, expected), backend
        assert stats["low_pairs"] > 0 and stats["bound_pairs"] > stats["low_pairs"], stats


def test_low_dimensional_bounds_on_all_datasets(low_bounds):
    for name, (make, n) in sorted(DATASETS.items()):
        features = make()
        expected = greedy_coreset_reference(features, n, generator=_gen(3))
        for backend, hot_size in (("numpy", 16), ("torch", 16), ("numpy", 4096)):
            stats = {}
            fast = greedy_coreset(features, n, generator=_gen(3), backend=backend, hot_size=hot_size, stats=stats)
            assert torch.equal(fast, expected), (name, backend, hot_size)
            assert stats["low_bounds"] > 0, name


def texture_like(n: int, seed: int) -> torch.Tensor:
    """Texture-like features: a compact bulk with a decaying spectrum in 64-d (most variance in a few
    directions) plus 1% scattered outliers farther out, the shape of real texture features."""
    gen = _gen(seed)
    spectrum = torch.logspace(0.0, -3.0, 64)
    x = torch.randn(n, 64, generator=gen) * spectrum
    far = torch.randperm(n, generator=gen)[: n // 100]
    x[far] = torch.randn(far.numel(), 64, generator=gen) * spectrum * 4.0
    return x


def test_low_dimensional_bounds_leave_few_direct_distances(monkeypatch):
    # Texture-like data: the triangle test alone computes direct distances for many more elements than move;
    # the bound in the principal directions leaves few more than move (the floor), same selection.
    features = texture_like(20_000, 9)
    n = 400
    monkeypatch.setattr(coreset, "_LOW_MIN_HOT", 1 << 40)
    plain = {}
    expected = greedy_coreset(features, n, generator=_gen(1), backend="numpy", hot_size=20_000, stats=plain)
    monkeypatch.setattr(coreset, "_LOW_MIN_HOT", 0)
    monkeypatch.setattr(coreset, "_LOW_MIN_STEPS", 0)
    for backend in ("numpy", "torch"):
        stats = {}
        selected = greedy_coreset(features, n, generator=_gen(1), backend=backend, hot_size=20_000, stats=stats)
        assert torch.equal(selected, expected), backend
        assert stats["moved"] == plain["moved"] and stats["moved"] > 0  # the same elements move in both
        assert plain["candidates"] > 5 * plain["moved"], plain
        assert stats["candidates"] < 2 * stats["moved"], stats
    nearest = (features - features[expected[0]]).pow(2).sum(1)
    for k in range(1, n):
        assert int(expected[k]) == int(nearest.numpy().argmax())
        nearest = torch.minimum(nearest, (features - features[expected[k]]).pow(2).sum(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_selects_a_valid_greedy_sequence():
    features = bulk_and_outliers(5000, 32, 80)
    selected = greedy_coreset(features.cuda(), 100, generator=_gen(2), hot_size=64)
    cpu = greedy_coreset(features, 100, generator=_gen(2))
    # GPU reductions may round differently; the first picks are far from any tie.
    assert torch.equal(selected[:20], cpu[:20])


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
