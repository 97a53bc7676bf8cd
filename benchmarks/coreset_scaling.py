#!/usr/bin/env python3
"""Greedy k-center coreset: the current `greedy_coreset` against the previous one (`baseline`, kept below),
on the same data in the same run (median of --repeat runs each), plus a check that both select the same.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py                      # the small recipes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --cases bulk-1m      # 1M x 128, 10k centres
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --extract-bottle   # once: fit bottle, save .npy
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --cases bottle

Recipes (d = 128):
  bulk-50k / bulk-1m (/ bulk-1m-500): 97% N(0, 0.2^2 I) (a compact bulk of nominal patches)
                      + 3% N(0, I) (scattered outliers),
                      shuffled; 500 / 10,000 (/ 500) centres.
                      Seeds 81 (50k) and 13 (1M) start from an outlier, the case where the per-element test of
                      the old code flags ~every element at every step; seed 0 starts in the bulk.
  mixture-50k:        50 clusters, centres N(0, I), points N(centre, 0.2^2 I); 500 centres.
  lowrank-164k:       bottle-like synthetic: 164k rows of a rank-16 model with a decaying spectrum, plus
                      isotropic noise and 1% rows 3x farther out; 16.4k centres (10%).
  bottle:             real projected features (an .npy written by --extract-bottle), --ratio (10%) centres.
  bottle-native:      the same at native 900 x 900 (2.67M x 128, written by
                      `benchmarks/bottle_native_fit.py --save-projected /tmp/bottle_native_projected.npy`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchcore.core.coreset import greedy_coreset

# --- the previous implementation (commit 1f7e6d9), verbatim but for names: per-element triangle test ----
_PRUNE_SLACK = 1.001
_GEMV_MARGIN = 1e-4


def baseline(features: torch.Tensor, n: int, *, generator: torch.Generator, stats: dict | None = None) -> torch.Tensor:
    total, dim = features.shape
    features = features.float().contiguous()
    device = features.device
    first = int(torch.randint(total, (1,), generator=generator).item())
    selected = torch.empty(n, dtype=torch.long)
    centres = torch.empty(n, dim, device=device)
    centre_sq_norms = torch.empty(n, device=device)
    selected[0], centres[0] = first, features[first]
    centre_sq_norms[0] = features[first].pow(2).sum()
    nearest_sq = _squared_distances(features, torch.arange(total, device=device), features[first])
    prune_bound = nearest_sq * (4.0 * _PRUNE_SLACK)
    nearest_centre = torch.zeros(total, dtype=torch.long, device=device)
    num_candidates = 0
    for k in range(1, n):
        farthest = int(nearest_sq.numpy().argmax())
        centre = features[farthest]
        centre_sq = centre.pow(2).sum()
        selected[k], centres[k], centre_sq_norms[k] = farthest, centre, centre_sq
        norm_sum = centre_sq_norms[:k] + centre_sq
        centre_gap_sq = torch.addmv(norm_sum, centres[:k], centre, alpha=-2.0).sub_(norm_sum, alpha=_GEMV_MARGIN)
        mask = centre_gap_sq.numpy().take(nearest_centre.numpy()) < prune_bound.numpy()
        candidates = torch.from_numpy(np.flatnonzero(mask))
        num_candidates += candidates.numel()
        if candidates.numel() == 0:
            continue
        distance_sq = _squared_distances(features, candidates, centre)
        closer = distance_sq < nearest_sq[candidates]
        moved, moved_sq = candidates[closer], distance_sq[closer]
        nearest_sq[moved] = moved_sq
        prune_bound[moved] = moved_sq * (4.0 * _PRUNE_SLACK)
        nearest_centre[moved] = k
    if stats is not None:
        stats["distances"] = total + num_candidates
    return selected


def _squared_distances(features, rows, centre, block=1 << 16):
    if rows.numel() <= block:
        return (features.index_select(0, rows) - centre).pow_(2).sum(1)
    return torch.cat([(features.index_select(0, rows[i:i + block]) - centre).pow_(2).sum(1)
                      for i in range(0, rows.numel(), block)])


# --- recipes --------------------------------------------------------------------------------------------
def bulk(total: int, dim: int = 128, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    outliers = int(round(0.03 * total))
    x = torch.randn(total, dim, generator=gen) * 0.2
    x[:outliers] = torch.randn(outliers, dim, generator=gen)
    return x[torch.randperm(total, generator=gen)]


def mixture(total: int, dim: int = 128, clusters: int = 50, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen)
    labels = torch.randint(clusters, (total,), generator=gen)
    return centres[labels] + 0.2 * torch.randn(total, dim, generator=gen)


def lowrank(total: int, dim: int = 128, rank: int = 16, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(total, rank, generator=gen) * torch.logspace(0.5, -1.0, rank)
    x = factors @ torch.randn(rank, dim, generator=gen) / rank**0.5 + 0.05 * torch.randn(total, dim, generator=gen)
    far = torch.randperm(total, generator=gen)[: total // 100]
    x[far] *= 3.0
    return x


def load_bottle(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path)).float()


CASES = {
    "bulk-50k": (lambda a: bulk(50_000), 500),
    "mixture-50k": (lambda a: mixture(50_000), 500),
    "lowrank-164k": (lambda a: lowrank(164_000), 16_400),
    "bulk-1m": (lambda a: bulk(1_000_000), 10_000),
    "bulk-1m-500": (lambda a: bulk(1_000_000), 500),  # the old code at 1M in minutes, not hours
    "bottle": (lambda a: load_bottle(a.bottle_npy), None),  # --ratio of N centres (default 10%)
    "bottle-native": (lambda a: load_bottle(a.native_npy), None),  # 900 x 900, ~2.7M patches; --ratio 0.01
}


def extract_bottle(out: str) -> None:
    """Projected (centred) training features of MVTec bottle, as the estimator feeds them to greedy_coreset."""
    from patchcore.config import PatchCoreConfig
    from patchcore.estimator import model as model_module

    captured = {}
    original = model_module.greedy_coreset

    def capture(projected, n, *, generator):
        captured["x"] = projected.cpu().numpy().copy()
        return original(projected, n, generator=generator)

    model_module.greedy_coreset = capture
    try:
        cfg = PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=0.1)
        est = model_module.PatchCore(cfg)
        images = sorted(Path("/work/shared/data/mvtec_ad/bottle/train/good").glob("*.png"))
        est.fit([str(p) for p in images])
    finally:
        model_module.greedy_coreset = original
    np.save(out, captured["x"])
    print(f"saved {captured['x'].shape} to {out}")


def timed(fn, features, n, seed, repeat):
    times, result, stats = [], None, {}
    for _ in range(repeat):
        stats = {}
        start = time.perf_counter()
        result = fn(features, n, generator=torch.Generator().manual_seed(seed), stats=stats)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["bulk-50k", "mixture-50k"], choices=sorted(CASES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-repeat", type=int, default=None, help="runs of the old code (default --repeat)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--bottle-npy", default="/tmp/bottle_projected.npy")
    parser.add_argument("--native-npy", default="/tmp/bottle_native_projected.npy")
    parser.add_argument("--ratio", type=float, default=0.1, help="centres / N for the bottle cases")
    parser.add_argument("--extract-bottle", action="store_true", help="fit bottle once and save --bottle-npy")
    args = parser.parse_args()
    if args.extract_bottle:
        extract_bottle(args.bottle_npy)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}")
    header = (f"{'case':<14} {'N':>9} {'n':>6} {'old s':>8} {'new s':>8} {'old/new':>8} {'new s/Mpatch':>12} "
              f"{'old dist/N/step':>15} {'new dist/N/step':>15} {'same':>5}")
    print(header)
    rows = []
    for name in args.cases:
        make, n = CASES[name]
        features = make(args)
        total = features.shape[0]
        n = n or int(round(args.ratio * total))
        new_t, new_all, new_sel, new_stats = timed(greedy_coreset, features, n, args.seed, args.repeat)
        work_new = (new_stats["distances"] + new_stats["bound_pairs"]) / (total * n)
        if args.no_baseline:
            old_t, same, work_old = float("nan"), "-", float("nan")
        else:
            old_t, old_all, old_sel, old_stats = timed(baseline, features, n, args.seed,
                                                       args.baseline_repeat or args.repeat)
            same = "yes" if torch.equal(old_sel, new_sel) else "NO"
            work_old = old_stats["distances"] / (total * n)
        line = (f"{name:<14} {total:>9} {n:>6} {old_t:>8.2f} {new_t:>8.2f} {old_t / new_t:>8.1f} "
                f"{new_t / total * 1e6:>12.2f} {work_old:>15.4f} {work_new:>15.4f} {same:>5}")
        print(line, flush=True)
        print(f"    new runs {[round(t, 2) for t in new_all]}  stats {new_stats}", flush=True)
        rows.append(line)
    return 0 if all("NO" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
