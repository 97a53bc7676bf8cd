#!/usr/bin/env python3
"""The torch path and the runtime side by side (issue 17): parity, accuracy per precision, speed, memory.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_bench.py ../shared/data \\
        --category mvtec_ad/bottle --category mvtec_ad_reduced/hazelnut -o results/runtime_bench.json
    # speed, memory and install size (models and exports from a first run; ~10 min on 2 loaded cores):
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_bench.py ../shared/data --category mvtec_ad/bottle \\
        --reuse --speed-only --install-size --timing-images 64 --repeats 5 -o results/runtime_bench_speed.json
    # anomalib's PatchCore fitted and run on the same category, then ours on the same files (its fit alone
    # takes 4-10 min here, so it runs in a second invocation):
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_bench.py ../shared/data --category mvtec_ad/bottle \\
        --reuse --speed-only --no-timing --peers ../shared/peers -o results/runtime_bench_anomalib.json

Per category: fit (EfficientNet-Lite0, MVTec geometry 256/224, coreset 1% unless --coreset-ratio), save, export
(fp32 graph; int8 calibrated on 32 training images), then
- parity of the runtime (onnxruntime fp32, OpenVINO fp32) with the library on every test image: largest
  relative image-score difference, largest map difference relative to the map's max, labels identical;
- image AUROC, pixel AUROC and AUPRO (at the 224 crop) of every backend and precision;
- predict ms/img from files (decoding included) and on images decoded beforehand, batch 1 and 16, 1 and 2
  threads, over --timing-images files (several batches: decoding overlaps the model), each backend in a fresh
  process of its own, backends interleaved in each repeat, medians, the load average beside them;
- peak RSS of a process that loads the model and scores 16 files, per backend;
- with --install-size: the installed size of a fresh venv with only the runtime (the `runtime` extra of
  pyproject.toml and this package without dependencies), and + openvino; RSS of a scoring process there;
- with --peers DIR: anomalib's PatchCore (DIR/run_peer.py, same backbone weights, coreset ratio, images, batch 16,
  2 threads) fitted and run on every test image, beside our predict from the same files at batch 16, 2 threads.
--speed-only skips parity and accuracy (measured by a full run; deterministic).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
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
    """A callable paths -> (scores, maps) for one backend, thread count and batch size; its `.decoded`
    scores images decoded beforehand ((H, W, 3) uint8 arrays) the same way."""
    if BACKENDS[name] is None:
        def setup():  # the library's settings are global (torch threads) or on the shared model: set per call
            torch.set_num_threads(threads)
            model.config = dataclasses.replace(model.config, batch_size=batch)

        def run(paths):
            setup()
            scores, maps = [], []
            for b in model.iter_predict(paths):
                if b.result is not None:
                    scores.append(b.result.scores.numpy())
                    maps.append(np.stack([np.asarray(m) for m in b.result.maps]))
            return np.concatenate(scores), np.concatenate(maps)

        def decoded(images):
            setup()
            tensors = [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) for a in images]
            return model.predict(tensors)
        run.decoded = decoded
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

    def decoded(images):
        return runtime.predict(images)
    run.decoded = decoded
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
    if not args.speed_only:
        out.update(accuracy_and_parity(model, model_path, export, items))

    if not args.no_timing:
        # Timing streams several batches, so that decoding overlaps the model as in a folder of parts (16 files at
        # batch 16 are one batch: nothing to overlap); a short test split is topped up with training images.
        timing = (paths + [str(p) for p in train])[:args.timing_images]
        out.update(speed_and_memory(model_path, export, paths, timing, args))
    if args.peers:
        out["anomalib"] = peer_side_by_side(category, paths, model_path, export, args, work)
    return out


def time_worker(spec: dict) -> dict:
    """In a process of its own: one backend at every (threads, batch) of spec, from files and on decoded images,
    each after an untimed pass; ms per image (wall and process CPU)."""
    name, paths = spec["name"], spec["paths"]
    model = PatchCore.load(spec["model"], device="cpu") if BACKENDS[name] is None else None
    decoded = [read_image(p) for p in paths]
    out: dict = {}
    for threads, batch in spec["settings"]:
        run = scorer(name, model, Path(spec["model"]), Path(spec["export"]), threads, batch)
        modes = [("files", run, paths)] + ([("decoded", run.decoded, decoded)] if spec.get("decoded", True) else [])
        for mode, call, inputs in modes:
            call(inputs)  # warm-up: a whole untimed pass (a fresh process's first batches run slower)
            started, cpu_started = time.perf_counter(), time.process_time()
            call(inputs)
            key = f"{mode} threads={threads} batch={batch}"
            out[key] = 1000 * (time.perf_counter() - started) / len(inputs)
            out[f"cpu {key}"] = 1000 * (time.process_time() - cpu_started) / len(inputs)
    return out


def timed_per_process(names, model_path: Path, export: Path, paths, settings, repeats: int, *,
                      decoded: bool = True) -> dict:
    """{backend: {key: [ms per repeat]}}: every backend in a fresh process of its own, backends interleaved in each
    repeat. Never two engines in one process: a compiled OpenVINO model in the process slowed torch's backbone
    there at one thread in some runs (9.2 -> 11.6-15.4 ms per image; not in others; not by spinning, cause not
    found)."""
    times: dict = {name: {} for name in names}
    for _ in range(repeats):
        for name in names:
            spec = {"name": name, "model": str(model_path), "export": str(export), "paths": [str(p) for p in paths],
                    "settings": settings, "decoded": decoded}
            done = subprocess.run([sys.executable, __file__, "--time-worker", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"timing {name}: {done.stderr[-2000:]}")
            for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
                times[name].setdefault(key, []).append(value)
    return times


def speed_and_memory(model_path: Path, export: Path, paths, timing_paths, args) -> dict:
    """Every (backend, threads, batch) from files and on decoded images, each backend in its own process,
    interleaved in each repeat; RSS."""
    out: dict = {}
    settings = [(threads, batch) for threads in (1, 2) for batch in (1, 16)]
    configs = [(name, threads, batch) for name in BACKENDS for threads, batch in settings]
    out["load_average_before_timing"] = os.getloadavg()
    times = timed_per_process(list(BACKENDS), model_path, export, timing_paths, settings, args.repeats)
    out["load_average_after_timing"] = os.getloadavg()
    medians = {((n, t, b), mode): statistics.median(times[n][f"{mode} threads={t} batch={b}"])
               for (n, t, b) in configs for mode in ("files", "decoded")}
    for mode in ("files", "decoded"):
        out[f"ms_per_image_{mode}"] = {f"{n} threads={t} batch={b}": medians[((n, t, b), mode)]
                                       for (n, t, b) in configs}
        out[f"time_ratio_to_torch_{mode}"] = {
            f"{n} threads={t} batch={b}": medians[((n, t, b), mode)] / medians[(("torch", t, b), mode)]
            for (n, t, b) in configs if n != "torch"}
    out["cpu_ms_per_image_files"] = {f"{n} threads={t} batch={b}":
                                     statistics.median(times[n][f"cpu files threads={t} batch={b}"])
                                     for (n, t, b) in configs}
    out["timing"] = {"images": len(timing_paths), "repeats": args.repeats}

    out["rss"] = {}
    for name in BACKENDS:
        out["rss"][name] = rss_of(sys.executable, name, model_path, export, paths[:16])
    return out


def accuracy_and_parity(model, model_path: Path, export: Path, items) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of every backend on every test image; parity with the library."""
    out: dict = {}
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
    return out


def rss_of(python: str, name: str, model_path: Path, export: Path, files) -> dict | str:
    """Peak RSS of a fresh process (`python`) that loads the model and scores `files` with backend `name`."""
    done = subprocess.run([python, "-c", RSS_SCRIPT, name, str(model_path), str(export), *map(str, files)],
                          capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else done.stderr[-500:]


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def install_size(work: Path, model_path: Path, export: Path, files) -> dict:
    """Installed size of fresh venvs: empty; the runtime alone (its extra in pyproject.toml + this package
    without dependencies); + openvino. Then the peak RSS of a scoring process in the runtime-only venv."""
    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["runtime"]
    out: dict = {"runtime_requirements": extra}
    wheels = work / "wheel"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(root)], check=True)
    wheel = next(wheels.glob("patchcore-*.whl"))
    sizes = {}
    for name, requirements in (("empty", []), ("runtime", extra), ("runtime+openvino", [*extra, "openvino"])):
        venv = work / f"venv-{name}"
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        if requirements:
            subprocess.run([*pip, *requirements], check=True)
            subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        largest = sorted(((dir_mb(d), d.name) for d in site.iterdir() if d.is_dir()), reverse=True)[:8]
        sizes[name] = {"venv_mb": dir_mb(venv), "site_packages_mb": dir_mb(site),
                       "largest_mb": {n: round(mb, 1) for mb, n in largest}}
    out["fresh_venv"] = sizes
    out["runtime_over_empty_mb"] = sizes["runtime"]["venv_mb"] - sizes["empty"]["venv_mb"]
    site = next((root / ".venv" / "lib").glob("python*/site-packages"))
    out["this_venv_site_packages_mb"] = dir_mb(site)  # the torch path's environment (CUDA torch here)
    out["torch_packages_mb"] = {name: dir_mb(site / name) for name in ("torch", "nvidia", "triton")
                                if (site / name).is_dir()}
    python = str(work / "venv-runtime" / "bin" / "python")
    out["rss_in_runtime_venv"] = rss_of(python, "ort-fp32", model_path, export, files)
    return out


def peer_side_by_side(category: Path, paths, model_path: Path, export: Path, args, work: Path) -> dict:
    """anomalib's PatchCore fitted and run on this category (DIR/run_peer.py: its own process, fit then predict
    on every test image, batch 16, 2 threads), then our predict from the same files at batch 16, 2 threads."""
    peers = Path(args.peers)
    result = work / f"anomalib_{category.name}.json"
    load_before = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(peers / "run_peer.py"), "--impl", "anomalib", "--data", str(category),
                           "--backbone", "effnet-lite0", "--coreset", str(args.coreset_ratio), "--batch-size", "16",
                           "--threads", "2", "--out", str(result)], capture_output=True, text=True)
    out: dict = {"wall_s": time.perf_counter() - started, "load_average_before": load_before,
                 "load_average_after": os.getloadavg()}
    if done.returncode != 0:
        out["error"] = done.stderr[-2000:]
        return out
    peer = json.loads(result.read_text())
    out.update({k: peer.get(k) for k in ("n_test", "predict_s_per_image", "predict_cpu_s_per_image", "peak_rss_mib",
                                         "image_auroc", "pixel_auroc", "fit_s")})
    out["settings"] = {k: peer["settings"].get(k) for k in ("input_size", "resize", "crop", "coreset_ratio",
                                                            "batch_size", "threads", "memory_bank_shape")}
    # Ours on the same files (every test image), right after, interleaved, batch 16, 2 threads.
    times = timed_per_process(list(BACKENDS), model_path, export, paths, [(2, 16)], args.repeats, decoded=False)
    ours = {name: statistics.median(v["files threads=2 batch=16"]) for name, v in times.items()}
    out["ours_ms_per_image_files threads=2 batch=16"] = ours
    out["ours_cpu_ms_per_image"] = {name: statistics.median(v["cpu files threads=2 batch=16"])
                                    for name, v in times.items()}
    out["load_average_after_ours"] = os.getloadavg()
    # Wall-clock ratios (anomalib's and ours measured minutes apart: read beside the load averages) and CPU-time
    # ratios (process CPU per image, all threads: less sensitive to other jobs).
    out["anomalib_over_ours"] = {name: 1000 * peer["predict_s_per_image"] / ms for name, ms in ours.items()}
    out["anomalib_over_ours_cpu"] = {name: 1000 * peer["predict_cpu_s_per_image"] / ms
                                     for name, ms in out["ours_cpu_ms_per_image"].items()}
    return out


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--time-worker":
        print(json.dumps(time_worker(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="MVTec AD root")
    parser.add_argument("--category", action="append", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--timing-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/runtime_bench")
    parser.add_argument("--reuse", action="store_true", help="reuse a model and export already in --work")
    parser.add_argument("--speed-only", action="store_true", help="skip parity and accuracy")
    parser.add_argument("--no-timing", action="store_true", help="skip the per-configuration timing and RSS")
    parser.add_argument("--install-size", action="store_true", help="measure fresh venvs (pip, a few minutes)")
    parser.add_argument("--peers", help="the peer harness folder (run_peer.py): run anomalib beside")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpus": os.cpu_count(),
               "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "load_average_at_start": os.getloadavg(), "categories": []}
    for name in args.category:
        results["categories"].append(category_bench(Path(args.root) / name, args, work))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=1))
    if args.install_size:
        first = Path(args.category[0]).name
        files = [item.path for item in load_split(Path(args.root) / args.category[0]).items][:16]
        results["install"] = install_size(work, work / f"{first}.model", work / f"{first}.onnx", files)
    results["load_average_at_end"] = os.getloadavg()
    results["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
