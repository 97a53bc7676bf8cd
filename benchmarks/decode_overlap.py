#!/usr/bin/env python3
"""Predict from files against predict on already-decoded images, torch and runtime paths (issue 17 point 6).

    .venv/bin/patchcore fit ../shared/data/mvtec_ad/bottle/train/good -o /tmp/dec_bottle.patchcore \\
        --backbone efficientnet_lite0 --coreset-ratio 0.01
    .venv/bin/patchcore export /tmp/dec_bottle.patchcore --static-size
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_overlap.py /tmp/dec_bottle.patchcore \\
        ../shared/data/mvtec_ad/bottle/test -o results/decode_overlap.json

Per path (torch: PatchCore, runtime: onnxruntime fp32) and batch size (1, 16), `--threads` threads for the
model (torch.set_num_threads / Runtime threads), ms per image, median of --repeats, all variants interleaved
in each repeat:
- decoded: `predict` on images decoded beforehand (torch: (3, H, W) uint8 tensors; runtime: arrays);
- files: `iter_predict` on the paths (decoding in iter_image_batches's threads, io/fast_decode.py on);
- files, 1 decoding thread: the same with one decoding thread instead of two;
- files, Pillow only: the same with io/fast_decode.py off (every file through Pillow, as before);
- files, pyspng.load: PNG through pyspng's own binding, which holds the GIL while it decodes (torch only);
- decode only: iter_image_batches on the paths, nothing scored (both decoders; and with one thread).
The share of decoding hidden behind the model: (decoded + decode only, 1 thread - files) / (decode only, 1 thread).
Also the process's CPU time per image (all threads): on a loaded machine the wall times measure the share of
the CPU the process got as much as the overlap; CPU times say what decoding costs on top of the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from decode_candidates import write_result  # beside this file

from patchcore import PatchCore
from patchcore.io import fast_decode, images
from patchcore.runtime import Runtime

INSTALLED = fast_decode.decoders


def with_pyspng_load():
    """The installed decoders, PNG through pyspng.load (which holds the GIL while it decodes) instead."""
    import pyspng

    def decode(data: bytes, height: int, width: int):
        pixels = pyspng.load(data)
        return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels
    return {**INSTALLED(), "PNG": decode}


def drain(iterator) -> None:
    for _ in iterator:
        pass


def variants(model: PatchCore, runtime: Runtime, paths: list[Path], batch: int) -> dict:
    """name -> callable that scores (or decodes) every image once."""
    arrays = [images.read_image(p) for p in paths]
    tensors = [images.as_uint8_tensor(a) for a in arrays]

    def torch_setup():
        model.config = dataclasses.replace(model.config, batch_size=batch)

    def runtime_setup():
        runtime.config = dataclasses.replace(runtime.config, batch_size=batch)

    def with_decoders(decoders, setup, run, workers=2):
        def go():
            fast_decode.decoders = decoders
            images.iter_image_batches.__kwdefaults__["workers"] = workers  # the torch path's (inputs.iter_batches)
            setup()
            run()
        return go

    return {
        "torch decoded": with_decoders(INSTALLED, torch_setup, lambda: model.predict(tensors)),
        "torch files": with_decoders(INSTALLED, torch_setup, lambda: drain(model.iter_predict(paths))),
        "torch files, 1 decoding thread": with_decoders(INSTALLED, torch_setup,
                                                        lambda: drain(model.iter_predict(paths)), workers=1),
        "torch files, Pillow only": with_decoders(dict, torch_setup, lambda: drain(model.iter_predict(paths))),
        "torch files, pyspng.load": with_decoders(with_pyspng_load, torch_setup,
                                                  lambda: drain(model.iter_predict(paths))),
        "runtime decoded": with_decoders(INSTALLED, runtime_setup, lambda: runtime.predict(arrays)),
        "runtime files": with_decoders(INSTALLED, runtime_setup, lambda: drain(runtime.iter_predict(paths))),
        "runtime files, 1 decoding thread": with_decoders(INSTALLED, runtime_setup,
                                                          lambda: drain(runtime.iter_predict(paths, workers=1))),
        "runtime files, Pillow only": with_decoders(dict, runtime_setup,
                                                    lambda: drain(runtime.iter_predict(paths))),
        "decode only": with_decoders(INSTALLED, lambda: None,
                                     lambda: drain(images.iter_image_batches(paths, batch, as_tensors=False))),
        "decode only, Pillow only": with_decoders(dict, lambda: None,
                                                  lambda: drain(images.iter_image_batches(paths, batch,
                                                                                          as_tensors=False))),
        "decode only, 1 thread": with_decoders(INSTALLED, lambda: None,
                                               lambda: drain(images.iter_image_batches(paths, batch, workers=1,
                                                                                       as_tensors=False))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("folder")
    parser.add_argument("--export", default=None, help="default MODEL.onnx")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, action="append", default=None, help="default 1 and 16")
    parser.add_argument("--images", type=int, default=40, help="the first N images of the folder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", action="append", default=None, help="variant names to run (default all)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = images.list_images(args.folder, recursive=True)[:args.images]
    model = PatchCore.load(args.model, device="cpu")
    runtime = Runtime.load(args.model, args.export or f"{args.model}.onnx", threads=args.threads)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {"uptime": uptime, "images": len(paths), "threads": args.threads, "torch_threads": torch.get_num_threads(),
              "fast_decoders": sorted(INSTALLED()), "ms_per_image": {}, "cpu_ms_per_image": {}}
    for batch in args.batch or [1, 16]:
        runs = variants(model, runtime, paths, batch)
        runs = {k: v for k, v in runs.items() if not args.only or k in args.only}
        for run in runs.values():  # warm-up
            run()
        times = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                run()
                times[name].append(1000 * (time.perf_counter() - started) / len(paths))
                cpu[name].append(1000 * (time.process_time() - started_cpu) / len(paths))
        row = {name: round(statistics.median(t), 2) for name, t in times.items()}
        result["cpu_ms_per_image"][f"batch {batch}"] = {name: round(statistics.median(t), 2) for name, t in cpu.items()}
        for side in ("torch", "runtime"):
            if f"{side} decoded" in row:
                for variant in ("files", "files, 1 decoding thread", "files, Pillow only", "files, pyspng.load"):
                    if f"{side} {variant}" in row:
                        row[f"{side} {variant} / decoded"] = round(row[f"{side} {variant}"] / row[f"{side} decoded"], 3)
        one = row.get("decode only, 1 thread")
        for side in ("torch", "runtime"):
            if one and f"{side} decoded" in row and f"{side} files" in row:
                row[f"{side} decoding hidden"] = round((row[f"{side} decoded"] + one - row[f"{side} files"]) / one, 3)
        result["ms_per_image"][f"batch {batch}"] = row
        print(f"batch {batch}", json.dumps(row), json.dumps(result["cpu_ms_per_image"][f"batch {batch}"]),
              file=sys.stderr, flush=True)
    fast_decode.decoders = INSTALLED
    return write_result(result, args.output)


if __name__ == "__main__":
    sys.exit(main())
