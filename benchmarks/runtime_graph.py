#!/usr/bin/env python3
"""The exported embedding graph alone against the module it was exported from, in eager torch (issue 17): the one
stage where the runtime and the torch path differ. ms per image at 1 and 2 threads, batch 1 and 16, on random
normalised input at the model's input size (the time does not depend on the pixels). Each engine runs in a fresh
process of its own (a compiled OpenVINO model in the process slowed torch at one thread in some runs), engines
interleaved over --rounds rounds; the median over rounds of each round's median.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_graph.py MODEL EXPORT_DIR [--rounds 3] [--repeats 9]

This bounds what predict can gain: at a given setting, runtime / torch for the whole predict lies between this
ratio and 1, nearer 1 the more of the time decoding, resizing and the search (shared) take.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ENGINES = ("torch eager", "onnxruntime", "openvino")
SETTINGS = [(threads, batch) for threads in (1, 2) for batch in (1, 16)]


def runner(engine: str, model_path: str, graph: str, threads: int, x: np.ndarray):
    """A call that runs `engine` once on x."""
    if engine == "torch eager":
        import torch

        from patchcore import PatchCore
        from patchcore.estimator.export import EmbeddingGraph

        torch.set_num_threads(threads)
        module, tx = EmbeddingGraph(PatchCore.load(model_path, device="cpu")).eval(), torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                module(tx)
        return run
    from patchcore.runtime.backends import Session

    session = Session(graph, engine, threads=threads)
    return lambda: session.run(x)


def worker(engine: str, model_path: str, export: str, repeats: int) -> dict:
    """In its own process: `engine` at every setting, after a warm-up call each; median ms per image."""
    from patchcore.runtime.bundle import read_manifest

    manifest = read_manifest(export)
    height, width = manifest.get("input_size") or (224, 224)
    out = {}
    for threads, batch in SETTINGS:
        x = np.random.default_rng(0).standard_normal((batch, 3, height, width)).astype(np.float32)
        run = runner(engine, model_path, os.path.join(export, manifest["graph"]), threads, x)
        run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - started) / batch)
        out[f"threads={threads} batch={batch}"] = statistics.median(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("export")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.export, args.repeats)))
        return 0
    rounds: dict = {engine: [] for engine in ENGINES}
    for _ in range(args.rounds):
        for engine in ENGINES:
            done = subprocess.run([sys.executable, __file__, args.model, args.export, "--repeats", str(args.repeats),
                                   "--worker", engine], capture_output=True, text=True, check=True)
            rounds[engine].append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = {}
    for threads, batch in SETTINGS:
        key = f"threads={threads} batch={batch}"
        ms = {engine: round(statistics.median(r[key] for r in rounds[engine]), 2) for engine in ENGINES}
        ratios = {engine: round(ms[engine] / ms["torch eager"], 3) for engine in ENGINES[1:]}
        table[key] = {"ms_per_image": ms, "over_torch": ratios}
    print(json.dumps({"table": table, "rounds": args.rounds, "repeats": args.repeats,
                      "load_average": [round(v, 2) for v in os.getloadavg()]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
