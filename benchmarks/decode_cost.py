"""What the hardened decode path costs on clean data (NOTES-hardening-decode.md has the numbers).

    python benchmarks/decode_cost.py [--data /work/shared/data/mvtec_ad/bottle/train/good] [--n 8]
    python benchmarks/decode_cost.py --fuzz 3000        # also a seeded fuzz run, in a child process

Per image, best of --repeats passes over --n files, one thread:
  before: torchvision decode_png (the former fast path for 8-bit PNG; JPEG always went through PIL)
  check:  what ruling out decode_png's crashes would have cost (walk chunks, CRC, inflate all IDAT)
  after:  read_image now (PIL for every file, limits from the header, short-data check when the last row
          is black), and its pieces; a black-bottom copy of the first image shows the short-data check
  batches: iter_image_batches throughput with 2 worker threads (header peek for the read-ahead included)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchcore.io import images
from patchcore.io.images import estimated_bytes, iter_image_batches, read_image


def best_ms(variants: dict, repeats: int) -> dict[str, float]:
    """name -> (fn, files): the best ms per file of each, the variants interleaved in every repeat so that
    a busy machine slows all of them alike."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, (fn, files) in variants.items():
            started = time.perf_counter()
            for path in files:
                fn(path)
            best[name] = min(best[name], (time.perf_counter() - started) / len(files))
    return {name: round(1000.0 * value, 2) for name, value in best.items()}


def torchvision_png(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.io import ImageReadMode, decode_png
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    return decode_png(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def full_png_check(path: Path) -> int:
    """Chunk walk + CRC of every chunk + inflate of all IDAT data (the cheapest complete pre-check)."""
    data, pos, inflater, total = path.read_bytes(), 8, zlib.decompressobj(), 0
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        stored = int.from_bytes(data[pos + 8 + length:pos + 12 + length], "big")
        if zlib.crc32(data[pos + 4:pos + 8 + length]) != stored:
            raise ValueError("crc")
        if kind == b"IDAT":
            total += len(inflater.decompress(data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/mvtec_ad/bottle/train/good")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fuzz", type=int, default=0, help="also run this many fuzz cases (tests/hostile.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pngs = sorted(Path(args.data).glob("*.png"))[: args.n]
    first = np.asarray(Image.open(pngs[0]).convert("RGB"))
    results: dict[str, object] = {"png": f"{len(pngs)} x {first.shape[1]}x{first.shape[0]} RGB from {args.data}"}
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = []
        for i, path in enumerate(pngs):
            jpegs.append(Path(tmp) / f"{i}.jpg")
            Image.open(path).convert("RGB").save(jpegs[-1], quality=90)
        black = first.copy()
        black[-20:] = 0
        black_bottom = Path(tmp) / "black_bottom.png"
        Image.fromarray(black).save(black_bottom)

        def pil_png(path):
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))

        r = args.repeats
        results["png_ms"] = best_ms({
            "before_torchvision_decode_png": (torchvision_png, pngs),
            "rejected_design_full_check_only": (full_png_check, pngs),
            "plain_pil_open_load_asarray": (pil_png, pngs),
            "after_read_image": (read_image, pngs),
            "after_read_image_black_last_row": (read_image, [black_bottom] * 4),
            "short_data_check_alone": (images._png_rows_missing, pngs),
            "header_peek_estimated_bytes": (estimated_bytes, pngs),
        }, r)
        results["jpeg_ms"] = best_ms({"before_and_after_pil": (pil_png, jpegs),
                                      "after_read_image": (read_image, jpegs)}, r)
        for name, files in (("png", pngs), ("jpeg", jpegs)):
            many = files * max(1, 32 // len(files))
            started = time.perf_counter()
            count = sum(len(b.images) for b in iter_image_batches(many, 8, workers=2))
            results[f"{name}_iter_image_batches_2_workers_images_per_s"] = count / (time.perf_counter() - started)
    if args.fuzz:
        hostile = Path(__file__).resolve().parents[1] / "tests" / "hostile.py"
        started = time.perf_counter()
        child = subprocess.run([sys.executable, str(hostile), "fuzz", "--cases", str(args.fuzz), "--seed", "1"],
                               capture_output=True, text=True)
        results["fuzz"] = {"returncode": child.returncode, "seconds": time.perf_counter() - started,
                           "result": child.stdout.strip().splitlines()[-1] if child.stdout.strip() else None,
                           "stderr_tail": child.stderr[-500:]}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
