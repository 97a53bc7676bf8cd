"""Ray against the single process on the same files, in the same run (docs/CLUSTER.md).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ray_bench.py --data ../shared/data/mvtec_ad/bottle \
        --workdir /tmp/ray-bench --repeats 3 -o ray_bench.json

1. fit: the plain fit and `fit --ray` (RayPatchCore) on DATA/train/good; same model file bytes?
2. predict: images/s, scores only, over DATA/train/good + DATA/test: the single process (PatchCore.load +
   iter_predict over the files, the path `patchcore predict` takes) against `predict --ray` with 1 and 2
   actors (decoding in the actors) and 1 actor fed by decoding tasks (--decode tasks); end to end (model
   load and actor start included, Ray's own start-up not), and steady state (from the first chunk written
   to the last). Runs alternate; medians of --repeats, and each Ray run against the single run next to it
   (`paired_ratios`); --kinds picks the runs (e.g. single,ray_1), the JSON records the load averages.
3. recovery: one actor killed (SIGKILL) after its first chunk; the job's extra time against an unkilled
   run, and the time from the kill to the next chunk written (with the first Ray kind's backend: torch, or
   the lean runtime's torch-free actors for --kinds single_runtime,ray_1_runtime,...).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import ray

from patchcore import PatchCore, PatchCoreConfig
from patchcore.app.ray_cluster import RaySession
from patchcore.app.ray_fit import RayPatchCore
from patchcore.app.ray_predict import predict_on_ray
from patchcore.io.images import list_images
from patchcore.runtime import Runtime


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def single_process(load, paths: list[Path]) -> dict:
    """Load a model (`load()`: the estimator, or the lean runtime) and score the files with its iter_predict, in
    this process: the path `patchcore predict` (or `patchcore-score`) takes."""
    started = time.perf_counter()
    model = load()
    scores = []
    for batch in model.iter_predict(paths):
        if batch.result is not None:
            scores += batch.result.scores.tolist()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "n": len(scores)}


def part_times(out: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in (out / "scores").glob("part-*.parquet"))


def on_ray(model_file: Path, paths: list[Path], out: Path, actors: int, chunk: int, decode: str = "actor",
           export: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    backend = {"backend": "runtime", "backend_options": {"export_dir": str(export)}} if export else {}
    report = predict_on_ray(model_file, paths, out, actors=actors, chunk_size=chunk, decode=decode, **backend)
    seconds = time.perf_counter() - started
    times = part_times(out)
    steady = (len(paths) - chunk) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    return {"seconds": seconds, "images_per_s": len(paths) / seconds, "steady_images_per_s": steady,
            "n": report.n_scored}


def actor_pids() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ChunkScorer" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def killed_run(model_file: Path, paths: list[Path], out: Path, chunk: int, export: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = {}
    backend = {"backend": "runtime", "backend_options": {"export_dir": str(export)}} if export else {}

    def job():
        started = time.perf_counter()
        result["report"] = predict_on_ray(model_file, paths, out, actors=1, chunk_size=chunk, **backend)
        result["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=job)
    thread.start()
    kill_time = None
    while thread.is_alive() and kill_time is None:
        if (out / "scores").is_dir() and list((out / "scores").glob("part-*.parquet")) and actor_pids():
            for pid in actor_pids():
                os.kill(pid, signal.SIGKILL)
            kill_time = time.time()
            parts_at_kill = len(list((out / "scores").glob("part-*.parquet")))
        time.sleep(0.01)
    thread.join()
    after = [t for t in part_times(out) if t > kill_time]
    return {"seconds": result["seconds"], "n": result["report"].n_scored, "parts_at_kill": parts_at_kill,
            "kill_to_next_chunk_s": (after[0] - kill_time) if after else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="an MVTec category folder (train/good, test/)")
    parser.add_argument("--workdir", default="/tmp/ray-bench")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--copies", type=int, default=1,
                        help="score this many copies of the images (files copied into the workdir): a longer job")
    parser.add_argument("--skip-fit", action="store_true", help="use WORKDIR/plain.model from an earlier run")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--kinds", default="single,ray_1,ray_2,ray_1_decode_tasks",
                        help="which predict runs to alternate (comma-separated; default the torch four); the lean "
                             "runtime's: single_runtime, ray_1_runtime, ray_2_runtime (torch-free actors; the model "
                             "is exported to WORKDIR/plain.model.onnx first)")
    parser.add_argument("-o", "--output", default="ray_bench.json")
    args = parser.parse_args()
    data, work = Path(args.data), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train = list_images(data / "train" / "good")
    tests = list_images(data / "test", recursive=True)
    config = PatchCoreConfig(backbone=args.backbone, coreset_ratio=args.coreset_ratio)
    result: dict = {"cpus": os.cpu_count(), "images": len(train) + len(tests), "config": config.to_dict(),
                    "chunk": args.chunk, "load_average_start": os.getloadavg()}

    started = time.perf_counter()
    with RaySession("local"):
        result["ray_start_s"] = time.perf_counter() - started
        print(f"ray start {result['ray_start_s']:.1f} s", flush=True)

        fits: dict = {"plain": [], "ray": []}
        for _ in range(0 if args.skip_fit else max(1, args.repeats - 1)):
            for kind in ("plain", "ray"):
                started = time.perf_counter()
                cls = PatchCore if kind == "plain" else RayPatchCore
                model = cls(config, device="cpu").fit(train)
                model.save(work / f"{kind}.model")
                fits[kind].append(time.perf_counter() - started)
                report = model.fit_report_
                fits[f"{kind}_split"] = {"features_s": report.embed_seconds, "coreset_s": report.coreset_seconds,
                                         "thresholds_s": report.calibration_seconds}
                print(f"fit {kind}: {fits[kind][-1]:.1f} s", flush=True)
        if not args.skip_fit:
            result["fit"] = {"plain_s": statistics.median(fits["plain"]), "ray_s": statistics.median(fits["ray"]),
                             "runs": fits, "same_bytes": sha(work / "plain.model") == sha(work / "ray.model")}
        model_file = work / "plain.model"
        export = work / "plain.model.onnx"
        if "runtime" in args.kinds and not (export / "export.json").is_file():
            from patchcore.estimator.export import export_model

            export_model(PatchCore.load(model_file, device="cpu"), model_file, export)

        paths = train + tests
        for copy in range(1, args.copies):  # distinct files (repeats of one file are scored once)
            folder = work / f"copy{copy}"
            folder.mkdir(exist_ok=True)
            for i, path in enumerate(train + tests):
                target = folder / f"{i:04d}{path.suffix}"
                if not target.exists():
                    shutil.copyfile(path, target)
                paths.append(target)
        result["images"] = len(paths)
        kinds = {"single": lambda: single_process(lambda: PatchCore.load(model_file, device="cpu"), paths),
                 "ray_1": lambda: on_ray(model_file, paths, work / "out1", 1, args.chunk),
                 "ray_2": lambda: on_ray(model_file, paths, work / "out2", 2, args.chunk),
                 "ray_1_decode_tasks": lambda: on_ray(model_file, paths, work / "out3", 1, args.chunk, "tasks"),
                 "single_runtime": lambda: single_process(
                     lambda: Runtime.load(model_file, export, threads=os.cpu_count()), paths),
                 "ray_1_runtime": lambda: on_ray(model_file, paths, work / "out4", 1, args.chunk, export=export),
                 "ray_2_runtime": lambda: on_ray(model_file, paths, work / "out5", 2, args.chunk, export=export)}
        runs: dict = {kind: [] for kind in args.kinds.split(",")}
        for _ in range(args.repeats):
            for kind in runs:
                runs[kind].append(kinds[kind]())
            print({k: round(v[-1]["images_per_s"], 2) for k, v in runs.items()}, os.getloadavg(), flush=True)

        def median(kind, key):
            values = [r[key] for r in runs[kind] if r.get(key) is not None]
            return statistics.median(values) if values else None

        def base(kind):  # the single process of the same backend
            single = "single_runtime" if kind.endswith("runtime") else "single"
            return median(single, "images_per_s") if single in runs else None

        result["predict"] = {kind: {"images_per_s": median(kind, "images_per_s"),
                                    "steady_images_per_s": median(kind, "steady_images_per_s"),
                                    "ratio_to_single": base(kind) and median(kind, "images_per_s") / base(kind)}
                             for kind in runs}
        for kind in runs:  # each repeat's Ray run against the single run of its backend next to it
            base = "single_runtime" if kind.endswith("runtime") else "single"
            if base in runs:
                pairs = [s["seconds"] / r["seconds"] for s, r in zip(runs[base], runs[kind])]
                result["predict"][kind]["paired_ratios"] = pairs
                result["predict"][kind]["paired_ratio_median"] = statistics.median(pairs)
        result["predict"]["runs"] = runs
        # The recovery of the first Ray kind's backend (torch, or the lean runtime's torch-free actors).
        on_runtime = next((k for k in runs if k.startswith("ray_")), "ray_1").endswith("runtime")
        killed = [killed_run(model_file, paths, work / "killed", args.chunk, export if on_runtime else None)
                  for _ in range(0 if args.skip_recovery else max(1, args.repeats - 1))]
        unkilled_kind = "ray_1_runtime" if on_runtime else "ray_1"
        unkilled = median(unkilled_kind, "seconds") if killed and unkilled_kind in runs else None
        result["recovery"] = {} if not killed else {"runs": killed, "unkilled_s": unkilled,
                              "extra_s": None if unkilled is None
                              else statistics.median(k["seconds"] for k in killed) - unkilled,
                              "kill_to_next_chunk_s": statistics.median(
                                  k["kill_to_next_chunk_s"] for k in killed if k["kill_to_next_chunk_s"])}
        ray.shutdown()
    result["load_average_end"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
