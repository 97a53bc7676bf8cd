#!/usr/bin/env python3
"""Greedy k-center coreset: the current `greedy_coreset` against an earlier one, on the same data in the same
run (old and new runs interleaved, median of --repeat runs each), plus a check that both select the same.

--old git:COMMIT (default git:826e58f, the code before issue 18) loads `greedy_coreset` from that commit's
src/patchcore/core/coreset.py (needs the git checkout); --old baseline runs the plain pre-issue-10 algorithm
kept verbatim below.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py                      # the small recipes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --cases bulk-1m      # 1M x 128, 10k centres
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --extract-bottle   # once: fit bottle, save .npy
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --cases bottle
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --extract-texture  # once: real features, .npy
    OMP_WAIT_POLICY=PASSIVE python benchmarks/coreset_scaling.py --cases texture texture-real bottle --ratio 0.01

Recipes (d = 128):
  bulk-50k / bulk-1m (/ bulk-1m-500): 97% N(0, 0.2^2 I) (a compact bulk of nominal patches)
                      + 3% N(0, I) (scattered outliers),
                      shuffled; 500 / 10,000 (/ 500) centres.
                      Seeds 81 (50k) and 13 (1M) start from an outlier, the case where the per-element test of
                      the old code flags ~every element at every step; seed 0 starts in the bulk.
  mixture-50k:        50 clusters, centres N(0, I), points N(centre, 0.2^2 I); 500 centres.
  lowrank-164k:       bottle-like synthetic: 164k rows of a rank-16 model with a decaying spectrum, plus
                      isotropic noise and 1% rows 3x farther out; 16.4k centres (10%).
  texture:            texture-like features, 415,520 x 128 (530 images x 28 x 28 patches), the slow case of
                      issue 18: per image a random phase of a periodic weave, two cell types in a checkerboard
                      (a smooth 2-D manifold, harmonics mixed into 128-d), so each image's interior patches
                      are near-duplicates: a compact bulk whose values bunch near the maximum once the
                      manifold is covered; border patches (2 cells deep) carry per-position offsets:
                      scattered outliers; plus noise with a decaying spectrum (96-97% of the variance in 32
                      principal directions, as in real texture features). --ratio (10%) centres.
  texture-real:       real projected features of the same kind: efficientnet_lite0 at 256/224 on 530 woven-fabric
                      images (patchcore.evaluation.synthetic.fabric_texture, 256 x 256, seed 0), all patches
                      (an .npy written by --extract-texture; 415,520 x 128).
  bottle:             real projected features (an .npy written by --extract-bottle), --ratio (10%) centres.
  bottle-native:      the same at native 900 x 900 (2.67M x 128, written by
                      `benchmarks/bottle_native_fit.py --save-projected /tmp/bottle_native_projected.npy`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
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


def texture(images: int = 530, grid: int = 28, dim: int = 128, noise: float = 0.1, harmonics: int = 3,
            seed: int = 0) -> torch.Tensor:
    """Texture-like features (see the module docstring), images * grid * grid rows, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.arange(1, harmonics + 1, dtype=torch.float32)

    def weave(phase):  # (n, 2) phases -> (n, 4 * harmonics): a smooth periodic 2-D manifold, decaying harmonics
        x, y = phase[:, :1] * j, phase[:, 1:] * j
        return torch.cat([x.cos(), x.sin(), y.cos(), y.sin()], 1) / j.repeat(4)

    mix = torch.randn(4 * harmonics, dim, generator=gen)
    phase = torch.rand(images, 2, generator=gen) * 2 * torch.pi
    cell = torch.tensor([[0.0, 0.0], [torch.pi / 2, torch.pi / 2]])
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    kind = ((r + c) % 2).reshape(-1)
    nominal = weave((phase[:, None, :] + cell[kind][None]).reshape(-1, 2)) @ mix
    edge = torch.minimum(torch.minimum(r, c), torch.minimum(grid - 1 - r, grid - 1 - c)).reshape(-1).float()
    border = torch.randn(grid * grid, dim, generator=gen) * ((edge < 2).float() / (1 + edge))[:, None]
    spectrum = torch.logspace(0.0, -1.0, dim)
    spectrum *= (dim / spectrum.pow(2).sum()).sqrt()
    x = nominal + border.repeat(images, 1) + noise * torch.randn(images * grid * grid, dim, generator=gen) * spectrum
    return x[torch.randperm(x.shape[0], generator=gen)]


def load_bottle(path: str) -> torch.Tensor:
    return torch.from_numpy(np.load(path)).float()


CASES = {
    "bulk-50k": (lambda a: bulk(50_000), 500),
    "mixture-50k": (lambda a: mixture(50_000), 500),
    "lowrank-164k": (lambda a: lowrank(164_000), 16_400),
    "bulk-1m": (lambda a: bulk(1_000_000), 10_000),
    "bulk-1m-500": (lambda a: bulk(1_000_000), 500),  # the old code at 1M in minutes, not hours
    "texture": (lambda a: texture(), None),  # --ratio of N centres (default 10%)
    "texture-real": (lambda a: load_bottle(a.texture_npy), None),
    "bottle": (lambda a: load_bottle(a.bottle_npy), None),
    "bottle-native": (lambda a: load_bottle(a.native_npy), None),  # 900 x 900, ~2.7M patches; --ratio 0.01
}


def extract_bottle(out: str) -> None:
    """Projected (centred) training features of MVTec bottle, as the estimator feeds them to greedy_coreset."""
    from patchcore.config import PatchCoreConfig
    from patchcore.estimator import model as model_module

    captured = {}
    original = model_module.greedy_coreset

    def capture(projected, n, *, generator):  # the largest call: fit also makes a coreset per calibration fold
        if projected.shape[0] > captured.get("x", np.empty((0, 0))).shape[0]:
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


def extract_texture(out: str, count: int = 530) -> None:
    """Projected features of `count` woven-fabric images (256 x 256), all patches, as fit feeds them to the coreset."""
    from patchcore.config import PatchCoreConfig
    from patchcore.estimator import model as model_module
    from patchcore.evaluation.synthetic import fabric_texture

    rng = np.random.default_rng(0)
    images = [fabric_texture(rng, 256) for _ in range(count)]
    captured = {}

    def capture(projected, n, *, generator):  # the largest call: fit also makes a coreset per calibration fold
        if projected.shape[0] > captured.get("x", np.empty((0, 0))).shape[0]:
            captured["x"] = projected.cpu().numpy().copy()
        return torch.arange(n)  # the selection is not needed here

    original = model_module.greedy_coreset
    model_module.greedy_coreset = capture
    try:
        model_module.PatchCore(PatchCoreConfig(backbone="efficientnet_lite0", coreset_ratio=0.01,
                                               calibration_ratio=0.0)).fit(images)
    finally:
        model_module.greedy_coreset = original
    np.save(out, captured["x"])
    print(f"saved {captured['x'].shape} to {out}")


def load_old(spec: str):
    """The `greedy_coreset` to compare against: `baseline` (below) or git:COMMIT's core/coreset.py."""
    if spec == "baseline":
        return baseline
    commit = spec.removeprefix("git:")
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{commit}:src/patchcore/core/coreset.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"coreset_{commit}")
    exec(compile(source, f"{commit}:coreset.py", "exec"), module.__dict__)  # a trusted file of this repository
    return module.greedy_coreset


def timed_pair(fns, features, n, seed, repeats):
    """Runs of each fn interleaved (a, b, a, b, ...), so that load changes hit both alike. Wall seconds and the
    process's CPU seconds (all threads; on a shared machine the CPU time is the steadier measure of the work)."""
    times, cpu = [[] for _ in fns], [[] for _ in fns]
    results, stats = [None] * len(fns), [{} for _ in fns]
    for r in range(max(repeats)):
        for i, fn in enumerate(fns):
            if r >= repeats[i]:
                continue
            stats[i] = {}
            start, start_cpu = time.perf_counter(), time.process_time()
            results[i] = fn(features, n, generator=torch.Generator().manual_seed(seed), stats=stats[i])
            times[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [(statistics.median(t), t, statistics.median(c), c, res, st)
            for t, c, res, st in zip(times, cpu, results, stats)]


def profile(stats: dict) -> str:
    """Where the work went, per step: see _Greedy.stats in core/coreset.py."""
    steps = max(1, stats.get("steps", 1))
    per = {k: stats[k] / steps for k in ("hot_total", "low_bounds", "candidates", "moved", "members", "slots",
                                         "centre_gaps", "low_gaps") if k in stats}
    text = " ".join(f"{k}/step {v:.0f}" for k, v in per.items())
    pairs = stats.get("bound_pairs", 0) + stats.get("low_pairs", 0)
    return (f"steps {steps} {text} | rebuilds {stats.get('rebuilds', 0)} refreshed {stats.get('refreshed', 0)} "
            f"bound pairs {stats.get('bound_pairs', 0)} low pairs {stats.get('low_pairs', 0)} "
            f"({pairs / steps:.0f}/step) "
            f"direct distances {stats.get('distances', 0)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["bulk-50k", "mixture-50k"], choices=sorted(CASES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline-repeat", type=int, default=None, help="runs of the old code (default --repeat)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old", default="git:826e58f", help="baseline, or git:COMMIT (default: before issue 18)")
    parser.add_argument("--no-baseline", action="store_true", help="run the new code only")
    parser.add_argument("--bottle-npy", default="/tmp/bottle_projected.npy")
    parser.add_argument("--native-npy", default="/tmp/bottle_native_projected.npy")
    parser.add_argument("--texture-npy", default="/tmp/texture_projected.npy")
    parser.add_argument("--ratio", type=float, default=0.1, help="centres / N for the texture and bottle cases")
    parser.add_argument("--extract-bottle", action="store_true", help="fit bottle once and save --bottle-npy")
    parser.add_argument("--extract-texture", action="store_true", help="extract fabric features, save --texture-npy")
    parser.add_argument("-o", "--output", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if args.extract_bottle or args.extract_texture:
        if args.extract_bottle:
            extract_bottle(args.bottle_npy)
        if args.extract_texture:
            extract_texture(args.texture_npy)
        return 0
    old = None if args.no_baseline else load_old(args.old)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {args.seed}, old = {args.old}")
    header = (f"{'case':<14} {'N':>9} {'n':>6} {'old s':>8} {'new s':>8} {'old/new':>8} {'old s/Mpatch':>12} "
              f"{'new s/Mpatch':>12} {'old cpu s':>9} {'new cpu s':>9} {'cpu old/new':>11} {'same':>5}")
    print(header)
    rows = []
    for name in args.cases:
        make, n = CASES[name]
        features = make(args)
        total = features.shape[0]
        n = n or int(round(args.ratio * total))
        fns, repeats = [greedy_coreset], [args.repeat]
        if old is not None:
            fns, repeats = [old, greedy_coreset], [args.baseline_repeat or args.repeat, args.repeat]
        results = timed_pair(fns, features, n, args.seed, repeats)
        new_t, new_all, new_c, new_call, new_sel, new_stats = results[-1]
        old_t, old_all, old_c, old_call, same, old_stats = float("nan"), [], float("nan"), [], "-", {}
        if old is not None:
            old_t, old_all, old_c, old_call, old_sel, old_stats = results[0]
            same = "yes" if torch.equal(old_sel, new_sel) else "NO"
        row = dict(case=name, n_patches=total, n=n, old_s=old_t, new_s=new_t, old_runs=old_all, new_runs=new_all,
                   old_cpu_s=old_c, new_cpu_s=new_c, old_cpu_runs=old_call, new_cpu_runs=new_call,
                   old_s_per_mpatch=old_t / total * 1e6, new_s_per_mpatch=new_t / total * 1e6,
                   old_cpu_per_mpatch=old_c / total * 1e6, new_cpu_per_mpatch=new_c / total * 1e6, same=same,
                   old_stats=old_stats, new_stats=new_stats)
        line = (f"{name:<14} {total:>9} {n:>6} {old_t:>8.2f} {new_t:>8.2f} {old_t / new_t:>8.2f} "
                f"{row['old_s_per_mpatch']:>12.2f} {row['new_s_per_mpatch']:>12.2f} {old_c:>9.2f} {new_c:>9.2f} "
                f"{old_c / new_c:>11.2f} {same:>5}")
        print(line, flush=True)
        print(f"    new runs {[round(t, 2) for t in new_all]} (cpu {[round(t, 2) for t in new_call]})  "
              f"old runs {[round(t, 2) for t in old_all]} (cpu {[round(t, 2) for t in old_call]})")
        print(f"    new: {profile(new_stats)}")
        if old_stats:
            print(f"    old: {profile(old_stats)}", flush=True)
        rows.append(row)
    reference = next((r for r in rows if r["case"] == "bottle"), None)
    if reference is not None:  # per-patch cost against bottle's, measured in this run
        for r in rows:
            old_x = r["old_s_per_mpatch"] / reference["old_s_per_mpatch"]
            new_x = r["new_s_per_mpatch"] / reference["new_s_per_mpatch"]
            old_xc = r["old_cpu_per_mpatch"] / reference["old_cpu_per_mpatch"]
            new_xc = r["new_cpu_per_mpatch"] / reference["new_cpu_per_mpatch"]
            print(f"{r['case']:<14} per-patch cost / bottle's in this run: wall old {old_x:.2f} new {new_x:.2f};"
                  f" cpu old {old_xc:.2f} new {new_xc:.2f}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same"] != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
