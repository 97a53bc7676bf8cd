#!/usr/bin/env python3
"""Where the runtime's predict time goes, per image: decode, preprocess (resize, crop, normalise), the graph, the
exact 1-NN search, eq. 7, the maps; and predict on decoded images and from files, for comparison (issue 17).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_stages.py MODEL EXPORT_DIR IMAGES... \\
        [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from patchcore.core.scoring import anomaly_maps, reweighted_image_scores
from patchcore.io.images import read_image
from patchcore.runtime import Runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("export")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runtime = Runtime.load(args.model, args.export, threads=args.threads)
    paths = args.images
    images = [read_image(p) for p in paths]
    times: dict = {}

    def timed(stage, run, *inputs):
        started = time.perf_counter()
        result = run(*inputs)
        times.setdefault(stage, []).append(1000 * (time.perf_counter() - started) / len(paths))
        return result

    def decode(files):
        return [read_image(p) for p in files]

    def from_files(files):
        return list(runtime.iter_predict(files))

    for _ in range(args.repeats):
        state, bank, bank_sq_norms, _, index = runtime._state
        timed("decode", decode, paths)
        x = timed("preprocess", runtime.preprocess, images)
        features = timed("graph", runtime.embed, x)
        batch, h, w, dim = features.shape
        queries = features.reshape(batch, h * w, dim)
        dist, idx = timed("search", index.search, queries.reshape(-1, dim))
        dist, idx = dist.reshape(batch, -1), idx.reshape(batch, -1)
        timed("eq7", reweighted_image_scores, queries, dist, idx, bank, bank_sq_norms,
              runtime.config.reweight_neighbours, state.distance_scale)
        timed("maps", anomaly_maps, dist, (h, w), tuple(x.shape[-2:]), runtime.config.blur_sigma)
        timed("predict on decoded images", runtime.predict, images)
        timed("iter_predict from files", from_files, paths)
    print(json.dumps({"threads": args.threads, "images": len(paths), "repeats": args.repeats,
                      "load_average": [round(v, 2) for v in os.getloadavg()],
                      "ms_per_image": {k: round(statistics.median(v), 2) for k, v in times.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
