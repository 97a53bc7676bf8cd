"""Coreset subsampling of the memory bank (PATCHCORE.md section 2, paper section 3.2, Algorithm 1).

Greedy k-center (minimax facility location): repeatedly add the element farthest from everything
selected so far. We run it on a seeded Johnson-Lindenstrauss projection to d* dimensions.

`greedy_coreset` is the exact greedy selection made cheaper by the triangle inequality: a new centre c
can only become the nearest centre of x if ||c - a(x)|| < 2 ||x - a(x)||, where a(x) is x's current
nearest centre. Elements that fail that test are never touched, and they are most of them once the
coreset has grown. `greedy_coreset_reference` is the plain O(N^2) algorithm, kept as the oracle.
"""
from __future__ import annotations

import torch

# Conservative slack on the pruning test, so that float rounding can never skip an element whose
# distance the plain algorithm would have lowered (relative error of a 128-d squared distance ~1e-6).
_PRUNE_SLACK = 1.001


def coreset_count(n_total: int, ratio: float, size: int | None = None) -> int:
    """Coreset size from a ratio or an explicit count, clipped to [1, n_total]."""
    wanted = size if size is not None else int(round(ratio * n_total))
    return max(1, min(n_total, wanted))


def random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(in_dim, out_dim) Gaussian JL map, entries N(0, 1/out_dim): distances kept in expectation."""
    return torch.randn(in_dim, out_dim, generator=generator) / out_dim**0.5


def greedy_coreset(features: torch.Tensor, n: int, *, generator: torch.Generator) -> torch.Tensor:
    """(N, d) features -> (n,) indices in selection order; exact greedy k-center.

    Memory O(N): one distance and one centre index per element; never an N x N matrix.
    """
    total = features.shape[0]
    if not 1 <= n <= total:
        raise ValueError(f"coreset size must be in [1, {total}], got {n}")
    features = features.float().contiguous()
    first = int(torch.randint(total, (1,), generator=generator).item())
    selected = torch.empty(n, dtype=torch.long)
    centres = torch.empty(n, features.shape[1], dtype=features.dtype, device=features.device)
    selected[0], centres[0] = first, features[first]
    # Squared distances throughout: the greedy choice only compares them (argmax/min are monotone).
    nearest_sq = (features - features[first]).pow_(2).sum(1)
    nearest_centre = torch.zeros(total, dtype=torch.long, device=features.device)
    for k in range(1, n):
        farthest = int(torch.argmax(nearest_sq))
        centre = features[farthest]
        selected[k], centres[k] = farthest, centre
        centre_gap_sq = (centres[:k] - centre).pow_(2).sum(1)  # ||c - c_j||^2 for every earlier centre
        # Triangle inequality: ||x - c|| >= ||c - a(x)|| - ||x - a(x)||, so x can only move to c if
        # ||c - a(x)||^2 < 4 ||x - a(x)||^2.
        candidates = torch.nonzero(centre_gap_sq[nearest_centre] < (4.0 * _PRUNE_SLACK) * nearest_sq).squeeze(1)
        if candidates.numel() == 0:
            continue
        distance_sq = (features.index_select(0, candidates) - centre).pow_(2).sum(1)
        closer = distance_sq < nearest_sq[candidates]
        moved = candidates[closer]
        nearest_sq[moved] = distance_sq[closer]
        nearest_centre[moved] = k
    return selected


def greedy_coreset_reference(features: torch.Tensor, n: int, *, generator: torch.Generator) -> torch.Tensor:
    """The plain algorithm with a full distance matrix. O(N^2) memory: tests only."""
    features = features.float()
    total = features.shape[0]
    first = int(torch.randint(total, (1,), generator=generator).item())
    pairwise_sq = (features[:, None, :] - features[None, :, :]).pow(2).sum(-1)
    nearest_sq = pairwise_sq[first].clone()
    selected = [first]
    for _ in range(1, n):
        farthest = int(torch.argmax(nearest_sq))
        selected.append(farthest)
        nearest_sq = torch.minimum(nearest_sq, pairwise_sq[farthest])
    return torch.tensor(selected, dtype=torch.long)


def coverage_radius(features: torch.Tensor, selected: torch.Tensor, *, chunk: int = 4096) -> float:
    """max over all elements of the distance to the nearest selected one (the minimax objective)."""
    centres = features[selected]
    radius = 0.0
    for start in range(0, features.shape[0], chunk):
        block = features[start:start + chunk]
        radius = max(radius, float(torch.cdist(block, centres).min(1).values.max()))
    return radius
