#!/usr/bin/env python3
"""Bounded-memory fit on a large training set.

Makes COUNT training images from a folder of good images by flips, 90-degree rotations and random
crops (saved at 256 x 256, so the default resize 256 / crop 224 applies), then runs `patchcore fit`
on them in a child process and reports its wall time and peak RSS next to what holding every patch
feature in float32 would take.

    python benchmarks/large_fit.py --source ../shared/data/mvtec_ad/bottle/train/good \
        --count 2000 --workdir /tmp/large-fit --backbone wide_resnet50_2_random --coreset-ratio 0.01
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

import numpy as np
from PIL import Image


def make_images(source: Path, out: Path, count: int, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if len(list(out.glob("*.png"))) >= count:
        return
    sources = sorted(p for p in source.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        w, h = image.size
        side = int(min(w, h) * rng.uniform(0.8, 1.0))
        left, top = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        image = image.crop((left, top, left + side, top + side)).resize((256, 256), Image.BILINEAR)
        image = image.rotate(90 * int(rng.integers(4)))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(out / f"{i:05d}.png")


def sample_memory(pid: int, peaks: dict, stop: threading.Event, started: float) -> None:
    """Poll /proc/PID/status (Linux): the peaks of anonymous and file-backed resident memory, and when
    (the total peak comes exactly from getrusage; this says what it was made of)."""
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (OSError, ValueError):
            break
        for key in ("RssAnon", "RssFile"):
            if key in fields:
                mib = int(fields[key].split()[0]) / 1024.0
                if mib > peaks.get(key, (0.0, 0.0))[0]:
                    peaks[key] = (mib, time.perf_counter() - started)
        stop.wait(0.25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--source", required=True)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/patchcore-large-fit")
    ap.add_argument("--backbone", default="wide_resnet50_2_random")
    ap.add_argument("--coreset-ratio", default="0.01")
    ap.add_argument("--max-feature-memory-gb", default="1",
                    help="in-RAM feature budget before spilling (fit's default)")
    ap.add_argument("--out", default=None, help="JSON result file")
    a = ap.parse_args()
    work = Path(a.workdir)
    images = work / "train"
    started = time.perf_counter()
    make_images(Path(a.source), images, a.count)
    print(f"{a.count} images in {images} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    command = [sys.executable, "-m", "patchcore.app.cli", "fit", str(images), "-o", str(work / "large.model"),
               "--backbone", a.backbone, "--coreset-ratio", a.coreset_ratio, "--calibration-ratio", "0",
               "--max-feature-memory-gb", a.max_feature_memory_gb, "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TMPDIR=str(work))
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(process.pid, peaks, stop, started), daemon=True)
    sampler.start()
    _, fit_log = process.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(fit_log, file=sys.stderr)
    if process.returncode != 0:
        return process.returncode
    from safetensors import safe_open

    with safe_open(str(work / "large.model"), "pt") as handle:
        header = json.loads(handle.metadata()["patchcore"])
        bank = handle.get_slice("memory_bank").get_shape()
    patches = header["fitted"]["n_train_patches"]
    result = {"images": a.count, "backbone": a.backbone, "coreset_ratio": float(a.coreset_ratio),
              "patches": patches, "embedding_dim": bank[1], "bank_shape": bank,
              "all_features_float32_gib": patches * bank[1] * 4 / 2**30,
              "peak_rss_gib": peak_mib / 1024.0, "fit_wall_s": wall,
              "sampled_peaks_mib_at_s": {k: [round(v[0]), round(v[1])] for k, v in peaks.items()},
              "fit_log": fit_log.strip().splitlines()}
    print(json.dumps({k: v for k, v in result.items() if k != "fit_log"}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
