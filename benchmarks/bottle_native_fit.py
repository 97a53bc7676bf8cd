#!/usr/bin/env python3
"""Fit MVTec bottle at its native 900 x 900 (no resize, no crop): every training image, ~2.4M patches.

Runs the fit in a child process (so that its peak RSS is its own) and writes one JSON with the child's peak
RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss at the end), the RSS around the coreset step, `fit_report_`
(features / coreset split) and seconds per million patches.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bottle_native_fit.py --out /tmp/bottle_native.json
    ... --limit 8              # a quick run on the first 8 images
    ... --save-projected /tmp/bottle_native_projected.npy   # also keep the projected features (N x 128)
                                                             # for coreset-only timings (coreset_scaling.py)

Config: PatchCoreConfig(backbone="efficientnet_lite0", resize=None, crop=None, coreset_ratio=0.01,
calibration_ratio=0.0); fit(max_feature_memory=1 GiB): full-dimensional features past it spill to disk.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

DATA = Path("/work/shared/data/mvtec_ad/bottle/train/good")


def _rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> dict:
    import dataclasses

    import torch

    from patchcore.config import PatchCoreConfig
    from patchcore.estimator import model as model_module

    marks: dict[str, float] = {}
    original = model_module.greedy_coreset
    trace: list[tuple[float, float]] = []  # (seconds since start, RSS MiB) every --trace-every seconds
    t0 = time.perf_counter()
    stop = threading.Event()

    def sample():
        while not stop.wait(args.trace_every):
            trace.append((round(time.perf_counter() - t0, 1), round(_rss_mib())))

    threading.Thread(target=sample, daemon=True).start()

    def measured(projected, n, *, generator):
        marks["coreset_started_at_seconds"] = time.perf_counter() - t0
        marks["rss_before_coreset_mib"] = _rss_mib()
        marks["peak_before_coreset_mib"] = _peak_mib()
        if args.save_projected:  # inside fit_report_.coreset_seconds: subtract save_seconds
            import numpy as np
            started = time.perf_counter()
            np.save(args.save_projected, projected.cpu().numpy())
            marks["save_seconds"] = time.perf_counter() - started
        stats: dict = {}
        started = time.perf_counter()
        selected = original(projected, n, generator=generator, stats=stats)
        marks["greedy_seconds"] = time.perf_counter() - started
        marks["rss_after_coreset_mib"] = _rss_mib()
        marks["peak_after_coreset_mib"] = _peak_mib()
        marks["coreset_stats"] = {k: int(v) for k, v in stats.items()}
        return selected

    model_module.greedy_coreset = measured
    images = sorted(str(p) for p in DATA.glob("*.png"))[: args.limit or None]
    cfg = PatchCoreConfig(backbone="efficientnet_lite0", resize=None, crop=None, coreset_ratio=args.ratio,
                          calibration_ratio=0.0)
    started = time.perf_counter()
    model = model_module.PatchCore(cfg)
    model.fit(images, max_feature_memory=args.max_feature_memory)
    wall = time.perf_counter() - started
    stop.set()
    report = dataclasses.asdict(model.fit_report_)
    millions = report["n_patches"] / 1e6
    return dict(
        images=len(images), threads=torch.get_num_threads(), config=dict(backbone=cfg.backbone, resize=None,
                                                                          crop=None, coreset_ratio=args.ratio,
                                                                          calibration_ratio=0.0),
        grid=list(model.state_.grid), input_size=list(model.state_.input_size),
        max_feature_memory=args.max_feature_memory, fit_wall_seconds=wall, fit_report=report,
        embed_seconds_per_million_patches=report["embed_seconds"] / millions,
        coreset_seconds_per_million_patches=report["coreset_seconds"] / millions,
        projected_mib=report["n_patches"] * cfg.projection_dim * 4 / 2**20,
        peak_rss_mib=_peak_mib(), rss_trace_mib=trace, **marks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bottle_native.json")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=0, help="first N images only (0: all 209)")
    parser.add_argument("--max-feature-memory", type=int, default=1 << 30)
    parser.add_argument("--save-projected", default="")
    parser.add_argument("--trace-every", type=float, default=2.0, help="RSS sampling period, seconds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    command = [sys.executable, __file__, "--child", "--ratio", str(args.ratio), "--limit", str(args.limit),
               "--max-feature-memory", str(args.max_feature_memory), "--save-projected", args.save_projected,
               "--trace-every", str(args.trace_every)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_wall_seconds"] = time.perf_counter() - started
    # The child's own peak, as its parent sees it (RUSAGE_CHILDREN: the largest child so far, here the one).
    result["peak_rss_mib_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
