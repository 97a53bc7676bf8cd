#!/usr/bin/env python3
"""The torch path and the runtime side by side (issue 17): parity, accuracy per precision, speed, memory.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_bench.py ../shared/data \\
        --category mvtec_ad/bottle --category mvtec_ad_reduced/hazelnut -o results/runtime_bench.json

Per category: fit (EfficientNet-Lite0, MVTec geometry 256/224, coreset 1% unless --coreset-ratio), save, export
(fp32 graph; int8 calibrated on 32 training images), then
- parity of the runtime (onnxruntime fp32, OpenVINO fp32) with the library on every test image: largest
  relative image-score difference, largest map difference relative to the map's max, labels identical;
- image AUROC, pixel AUROC and AUPRO (at the 224 crop) of every backend and precision;
- predict ms/img from files (decoding included), batch 1 and 16, 1 and 2 threads, backends interleaved in
  each repeat, medians;
- peak RSS of a process that loads the model and scores 16 files, per backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.estimator.export import ExportError, export_model, quantize_int8
from patchcore.evaluation.datasets import load_split, read_mask
from patchcore.evaluation.metrics import aupro, auroc
from patchcore.io.images import read_image
from patchcore.runtime import Runtime

BACKENDS = {  # name -> (runtime backend, precision); "torch" is the library
    "torch": None,
    "ort-fp32": ("onnxruntime", "fp32"),
    "openvino-fp32": ("openvino", "fp32"),
    "openvino-bf16": ("openvino", "bf16"),
    "ort-int8": ("onnxruntime", "int8"),
}


def scorer(name: str, model: PatchCore, model_path: Path, export: Path, threads: int, batch: int):
    """A callable paths -> (scores, maps) for one backend, thread count and batch size."""
    if BACKENDS[name] is None:
        torch.set_num_threads(threads)
        model.config = dataclasses.replace(model.config, batch_size=batch)

        def run(paths):
            scores, maps = [], []
            for b in model.iter_predict(paths):
                if b.result is not None:
                    scores.append(b.result.scores.numpy())
                    maps.append(np.stack([np.asarray(m) for m in b.result.maps]))
            return np.concatenate(scores), np.concatenate(maps)
        return run
    backend, precision = BACKENDS[name]
    runtime = Runtime.load(model_path, export, backend=backend, threads=threads, precision=precision)
    runtime.config = dataclasses.replace(runtime.config, batch_size=batch)

    def run(paths):
        scores, maps = [], []
        for b in runtime.iter_predict(paths):
            if b.result is not None:
                scores.append(b.result.scores)
                maps.append(np.stack(list(b.result.maps)))
        return np.concatenate(scores), np.concatenate(maps)
    return run


RSS_SCRIPT = """
import sys, json

def hwm():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

name, model_path, export, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
if name == "torch":
    from patchcore import PatchCore
    model = PatchCore.load(model_path, device="cpu")
    after_load = hwm()
    model.predict(files)
else:
    from patchcore.runtime import Runtime
    backend, precision = {"ort-fp32": ("onnxruntime", "fp32"), "openvino-fp32": ("openvino", "fp32"),
                          "openvino-bf16": ("openvino", "bf16"), "ort-int8": ("onnxruntime", "int8")}[name]
    runtime = Runtime.load(model_path, export, backend=backend, precision=precision)
    after_load = hwm()
    runtime.predict(files)
print(json.dumps({"after_load_mib": after_load, "peak_mib": hwm(),
                  "torch_imported": "torch" in sys.modules}))
"""


def category_bench(category: Path, args, work: Path) -> dict:
    split = load_split(category)
    train = split.train
    model_path, export = work / f"{category.name}.model", work / f"{category.name}.onnx"
    config = PatchCoreConfig(backbone=args.backbone, coreset_ratio=args.coreset_ratio, seed=0)
    out: dict = {"category": category.name, "backbone": args.backbone, "coreset_ratio": args.coreset_ratio}
    torch.set_num_threads(2)
    if args.reuse and model_path.is_file() and (export / "export.json").is_file():
        model = PatchCore.load(model_path, device="cpu")
        out["reused"] = str(model_path)
    else:
        started = time.perf_counter()
        model = PatchCore(config, device="cpu").fit(train)
        model.save(model_path)
        out["fit_s"] = time.perf_counter() - started
        # Checked on test images: training images score near 0 (their patches are in the bank), where a
        # relative difference says nothing.
        checks = [item.path for item in split.items if item.label == 1][:4]
        try:
            report = export_model(model, model_path, export, check_images=checks)
        except ExportError as err:
            out["export_check_failed"] = str(err)
            report = export_model(model, model_path, export, verify=False)
        out["export"] = {"seconds": report.export_seconds, "graph_mb": report.graph_bytes / 1e6,
                         "dynamic_size": report.dynamic_size, "check_score_rel_diff": report.max_score_rel_diff}
        started = time.perf_counter()
        quantize_int8(model_path, export, train, max_images=32)
        out["int8_quantize_s"] = time.perf_counter() - started
    out["bank"] = list(model.memory_bank_.shape)

    items = split.items
    paths = [item.path for item in items]
    labels = np.array([item.label for item in items])
    masks = np.stack([model.preprocess.mask_geometry(read_mask(item.mask_path)) if item.mask_path is not None
                      else np.zeros(tuple(model.input_size_), dtype=bool) for item in items])
    results = {}
    for name in BACKENDS:
        scores, maps = scorer(name, model, model_path, export, 2, 8)(paths)
        results[name] = (scores, maps)
        out.setdefault("accuracy", {})[name] = {"image_auroc": auroc(labels, scores),
                                                "pixel_auroc": auroc(masks.reshape(-1), maps.reshape(-1)),
                                                "aupro": aupro(masks, maps)}
    ref_scores, ref_maps = results["torch"]
    ref_labels = model.predict(paths).labels.numpy()
    for name in ("ort-fp32", "openvino-fp32", "openvino-bf16", "ort-int8"):
        scores, maps = results[name]
        runtime_labels = scores > model.image_threshold_
        out.setdefault("parity", {})[name] = {
            "max_score_rel_diff": float(np.max(np.abs(scores - ref_scores) / np.abs(ref_scores))),
            "max_map_rel_diff": float(max(np.abs(m - r).max() / np.abs(r).max() for m, r in zip(maps, ref_maps))),
            "labels_identical": bool(np.array_equal(runtime_labels, ref_labels)),
            "labels_differing": int((runtime_labels != ref_labels).sum()),
        }

    timing_paths = paths[:args.timing_images]
    configs = [(name, threads, batch) for name in BACKENDS for threads in (1, 2) for batch in (1, 16)]
    runners = {c: scorer(c[0], model, model_path, export, c[1], c[2]) for c in configs if BACKENDS[c[0]] is not None}
    times: dict = {c: [] for c in configs}
    for _ in range(args.repeats):
        for c in configs:  # interleaved: every backend sees the same background load
            run = runners.get(c) or scorer(c[0], model, model_path, export, c[1], c[2])
            started = time.perf_counter()
            run(timing_paths)
            times[c].append(1000 * (time.perf_counter() - started) / len(timing_paths))
    out["ms_per_image_from_files"] = {f"{n} threads={t} batch={b}": statistics.median(v)
                                      for (n, t, b), v in times.items()}
    torch_ms = {(t, b): statistics.median(times[("torch", t, b)]) for t in (1, 2) for b in (1, 16)}
    # From files vs on images decoded beforehand (threads 2, batch 16): what decoding adds once it overlaps.
    decoded = [read_image(p) for p in timing_paths]
    tensors = [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) for a in decoded]
    ort = Runtime.load(model_path, export, threads=2)
    ort.config = dataclasses.replace(ort.config, batch_size=16)
    model.config = dataclasses.replace(model.config, batch_size=16)
    torch.set_num_threads(2)
    pre = {"torch": [], "ort-fp32": []}
    for _ in range(args.repeats):
        for name, run in (("torch", lambda: model.predict(tensors)), ("ort-fp32", lambda: ort.predict(decoded))):
            started = time.perf_counter()
            run()
            pre[name].append(1000 * (time.perf_counter() - started) / len(timing_paths))
    out["ms_per_image_decoded_beforehand threads=2 batch=16"] = {k: statistics.median(v) for k, v in pre.items()}
    out["time_ratio_to_torch"] = {f"{n} threads={t} batch={b}": statistics.median(v) / torch_ms[(t, b)]
                                  for (n, t, b), v in times.items() if n != "torch"}

    out["rss"] = {}
    for name in BACKENDS:
        done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, name, str(model_path), str(export),
                               *map(str, paths[:16])], capture_output=True, text=True,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        ok = done.returncode == 0
        out["rss"][name] = json.loads(done.stdout.strip().splitlines()[-1]) if ok else done.stderr[-500:]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="MVTec AD root")
    parser.add_argument("--category", action="append", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--timing-images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/runtime_bench")
    parser.add_argument("--reuse", action="store_true", help="reuse a model and export already in --work")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpus": os.cpu_count(),
               "torch": torch.__version__, "categories": []}
    for name in args.category:
        results["categories"].append(category_bench(Path(args.root) / name, args, work))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    results["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
