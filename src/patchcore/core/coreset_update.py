"""Continuing a greedy k-center coreset with new data (incremental update; PATCHCORE.md section 2).

The memory bank M_C of a fitted model is a greedy k-center selection. New nominal patches are added by
running the same greedy step further: the existing centres count as already selected, and the element
of the new patches farthest from every centre is added until each new patch lies within the bank's
coverage radius (or a size budget is spent). The old centres are never moved or dropped, so the old
bank is a subset of the new one and no nearest-neighbour distance can grow.

The coverage radius r (max over training patches of the distance to the nearest centre) is not stored
in a model file. For a greedy k-center selection every centre was, when chosen, at least r_k >= r away
from all earlier ones, so every pairwise centre distance is >= r: a low quantile of the bank's
nearest-other-element distances is an upper-bound estimate of r (the minimum would be the tightest one,
but exact duplicates and the projection's distortion make it fragile; see `bank_coverage_radius`).

All distances here are in the bank's own D-dimensional feature space (the space scoring uses), not the
d* projection the fit-time selection ran in: the radius that matters for scores is the D-space one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .coreset import _all_distances
from .knn import nearest, squared_norms

DEFAULT_RADIUS_QUANTILE = 0.05
_DEFAULT_SAMPLE = 4096


class CoresetExtension(NamedTuple):
    """Result of `extend_coreset`.

    selected: (k,) indices into the new features, in selection order (farthest first).
    stopped_by: "radius" (every new element within `radius`), "budget" (`max_new` reached) or
    "exhausted" (every new element was selected).
    covering_radius: max over the new elements of the distance to the nearest centre, after the update.
    initial_radius: the same before any new centre was added (how far the new data was from the bank).
    """

    selected: torch.Tensor
    stopped_by: str
    covering_radius: float
    initial_radius: float


@dataclass
class UpdateReport:
    """What an incremental update did; kept on the model as `update_report_` (not saved)."""

    n_images: int = 0  # new images read
    n_patches: int = 0  # their patch features, the candidates
    bank_before: int = 0
    bank_after: int = 0
    radius: float = 0.0  # the coverage radius the selection ran to
    stopped_by: str = ""  # "radius", "budget" or "exhausted" (see CoresetExtension)
    initial_radius: float = 0.0  # farthest new patch from the old bank
    covering_radius: float = 0.0  # farthest new patch from the new bank
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    @property
    def added(self) -> int:
        return self.bank_after - self.bank_before


def bank_coverage_radius(bank: torch.Tensor, *, quantile: float = DEFAULT_RADIUS_QUANTILE,
                         sample: int = _DEFAULT_SAMPLE, generator: torch.Generator,
                         bank_sq_norms: torch.Tensor | None = None) -> float:
    """(M, D) greedy k-center bank -> an upper-bound estimate of its coverage radius.

    The `quantile` of the distances from (a seeded sample of) bank rows to their nearest other row;
    exact duplicates (distance 0) are left out, since a greedy selection never picks one twice.
    """
    if bank.shape[0] < 2:
        return 0.0
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if bank_sq_norms is None:
        bank_sq_norms = squared_norms(bank)
    rows = torch.randperm(bank.shape[0], generator=generator)[:sample].to(bank.device)
    dist, idx = nearest(bank[rows], bank, 2, bank_sq_norms=bank_sq_norms)
    # Column 0 is the row itself unless it has a duplicate that sorts first; either way the other
    # column is the nearest other row.
    other = torch.where(idx[:, 0] == rows, dist[:, 1], dist[:, 0])
    other = other[other > 0]
    if other.numel() == 0:
        return 0.0
    return float(torch.quantile(other.double(), quantile))


def extend_coreset(bank: torch.Tensor, features: torch.Tensor, radius: float, *, max_new: int | None = None,
                   bank_sq_norms: torch.Tensor | None = None, block: int = 1 << 15) -> CoresetExtension:
    """Greedy k-center continued over new data: (M, D) bank (already selected), (N, D) features -> CoresetExtension.

    Adds the new element farthest from every centre, one at a time, while that distance is > radius
    and fewer than `max_new` were added. Memory O(N): one nearest-centre distance per new element.
    Ties go to the lowest index, as in `greedy_coreset`.
    """
    if features.ndim != 2 or bank.ndim != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} and bank {tuple(bank.shape)} must be (N, D), (M, D)")
    if max_new is not None and max_new < 0:
        raise ValueError(f"max_new must be >= 0, got {max_new}")
    total = features.shape[0]
    features = features.float()
    if total == 0:
        return CoresetExtension(torch.empty(0, dtype=torch.long), "exhausted", 0.0, 0.0)
    if bank_sq_norms is None:
        bank_sq_norms = squared_norms(bank)
    # Exact distances to the existing centres (the already-selected set of the greedy loop).
    nearest_dist = torch.cat([nearest(features[i:i + block], bank, 1, bank_sq_norms=bank_sq_norms)[0][:, 0]
                              for i in range(0, total, block)])
    initial = float(nearest_dist.max())
    limit = total if max_new is None else min(max_new, total)
    selected: list[int] = []
    while True:
        farthest = int(torch.argmax(nearest_dist))  # first index on ties
        if float(nearest_dist[farthest]) <= radius:
            stopped_by = "radius"
            break
        if len(selected) >= limit:
            stopped_by = "budget" if limit < total else "exhausted"
            break
        selected.append(farthest)
        # Update each element's nearest-centre distance with the new centre only (as in section 2), by the
        # direct distance expression of knn.nearest's exact distances and of greedy_coreset.
        torch.minimum(nearest_dist, _all_distances(features, features[farthest]).sqrt_(), out=nearest_dist)
    return CoresetExtension(torch.tensor(selected, dtype=torch.long), stopped_by,
                            float(nearest_dist.max()), initial)
