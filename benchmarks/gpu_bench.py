#!/usr/bin/env python3
"""GPU check (one prepared run on a lent H100): end-to-end predict from decoded uint8 tensors at batch 1
and at a large batch, and the coreset time for a paper-sized bank.

    python benchmarks/gpu_bench.py --out gpu.json          # wide_resnet50_2 random weights, 224 input

Targets from the speed issue (H100): >= 2,000 images/s at batch 32, <= 3 ms at batch 1, coreset of a
164k x 1024 bank at 10% in <= 3 s. Random weights are fine for speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - started)
    return out


def main() -> int:
    from patchcore import PatchCore, PatchCoreConfig
    from patchcore.core.coreset import greedy_coreset, random_projection

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="wide_resnet50_2_random")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bank-rows", type=int, default=163_856)  # bottle: 209 images x 784 patches
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}

    # Coreset on a paper-sized bank: 164k x 1024 -> projected to 128 -> 10 %.
    g = torch.Generator().manual_seed(0)
    features = torch.randn(a.bank_rows, 1024, generator=g).to(device)
    projection = random_projection(1024, 128, g).to(device)
    projected = features @ projection
    n = a.bank_rows // 10
    greedy_coreset(projected[:20_000], 200, generator=torch.Generator().manual_seed(0))  # warm-up
    seconds = timed(lambda: greedy_coreset(projected, n, generator=torch.Generator().manual_seed(0)), 1)[0]
    result["coreset_s_164k_10pct"] = seconds
    print(f"coreset {a.bank_rows} -> {n}: {seconds:.2f} s", file=sys.stderr)

    # End-to-end predict from decoded tensors with a 16k x 1024 bank (10 % of bottle).
    model = PatchCore(PatchCoreConfig(backbone=a.backbone, calibration_ratio=0.0), device=device)
    images = torch.randint(0, 256, (64, 3, 256, 256), dtype=torch.uint8, generator=g)
    model.fit(images[:21])  # any images: only the bank's size matters for timing
    bank = features[torch.randperm(a.bank_rows, generator=g)[:n].to(device)].contiguous()
    model.set_state(model.state_.replace(memory_bank=bank))
    batch = images[:a.batch].to(device)
    single = images[:1].to(device)
    for _ in range(3):
        model.predict_batch(batch)
        model.predict_batch(single)
    big = timed(lambda: model.predict_batch(batch), 10)
    one = timed(lambda: model.predict_batch(single), 30)
    result["throughput_images_per_s"] = a.batch / statistics.median(big)
    result["latency_ms_batch1"] = 1000 * statistics.median(one)
    result["batch"] = a.batch
    result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
