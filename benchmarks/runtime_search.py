#!/usr/bin/env python3
"""Exact 1-NN on one real bank and real patch features, interleaved (issue 17.7): the library's BankIndex on
torch and on numpy (what patchcore.runtime runs: BLAS at one thread, query blocks in `threads` threads), each
as built (the PCA-bound pruning, or the plain search where the bank is too small for the bound to pay) and
with the bound forced on (min_bank_rows=0), and the plain chunked GEMM search (knn.nearest) on torch and as
the runtime runs it on numpy (its query blocks in the threads: numpy's BLAS threads are never woken, whose
spinning slowed whatever ran after them).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/runtime_search.py MODEL IMAGES... [--repeats 7] [--threads 1]

MODEL: a fitted model file (e.g. `patchcore fit --backbone efficientnet_lite0 --coreset-ratio 0.01 --seed 0
-o bottle.model ../shared/data/mvtec_ad/bottle/train/good`); IMAGES: test images whose patches are the queries.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from patchcore import PatchCore
from patchcore.core.bank_index import BankIndex
from patchcore.core.knn import nearest, squared_norms
from patchcore.io.images import read_image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (the same for both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")

    def one_blas_thread(search, queries):  # as Runtime.load(threads=N) sets it
        with threadpool_limits(1, user_api="blas"):
            return search(queries)

    model = PatchCore.load(args.model, device="cpu")
    feats = torch.cat([model.embed(torch.from_numpy(read_image(p)).permute(2, 0, 1)[None].contiguous()).features[0]
                       for p in args.images])
    bank = model.memory_bank_.contiguous()
    index = model.bank_index
    queries_np, bank_np = feats.numpy(), bank.numpy()
    sq = squared_norms(bank_np)
    # What patchcore.runtime searches with: numpy, BLAS at one thread, query blocks in `threads` threads.
    numpy_index = BankIndex(bank_np, workers=args.threads)
    numpy_bound = BankIndex(bank_np, workers=args.threads, min_bank_rows=0)
    numpy_plain = BankIndex(bank_np, workers=args.threads, min_bank_rows=bank_np.shape[0] + 1)
    torch_bound = BankIndex(bank, min_bank_rows=0)
    runs = {"library BankIndex (torch)": lambda: index.search(feats),
            "library BankIndex, bound forced (torch)": lambda: torch_bound.search(feats),
            "library plain GEMM (torch)": lambda: nearest(feats, bank, 1),
            "runtime plain GEMM (numpy)": lambda: one_blas_thread(numpy_plain.search, queries_np),
            "runtime BankIndex, bound forced (numpy)": lambda: one_blas_thread(numpy_bound.search, queries_np),
            "runtime BankIndex (numpy)": lambda: one_blas_thread(numpy_index.search, queries_np)}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(1000 * (time.perf_counter() - started) / len(args.images))
    index.reset_stats()
    d1, i1 = index.search(feats)
    stats = index.stats_
    d2, i2 = one_blas_thread(lambda x: nearest(x, bank_np, 1, bank_sq_norms=sq), queries_np)
    d3, i3 = one_blas_thread(numpy_index.search, queries_np)
    out = {"bank": list(bank.shape), "queries": int(feats.shape[0]), "threads": args.threads,
           "bound_built": {"torch": index.bounds_, "numpy": numpy_index.bounds_},
           "load_average": [round(x, 2) for x in os.getloadavg()],
           "ms_per_image": {k: round(statistics.median(v), 2) for k, v in times.items()},
           "numpy_over_torch": round(statistics.median(times["runtime BankIndex (numpy)"])
                                     / statistics.median(times["library BankIndex (torch)"]), 3),
           "bank_index_pruned_share": 1 - (stats["candidates"] + stats["plain"]) / stats["pairs"],
           "same_neighbour_share": float((i1.numpy() == i2[:, 0]).mean()),
           "max_distance_difference": float(np.abs(d1.numpy() - d2[:, 0]).max()),
           "numpy_same_neighbour_share": float((i3 == i2[:, 0]).mean()),
           "numpy_max_distance_difference": float(np.abs(d3 - d2[:, 0]).max())}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
