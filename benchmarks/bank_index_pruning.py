"""How much of the bank the exact 1-NN search (core/bank_index.py) prunes on real features: bottle at 224
and at its native size, with the test images as queries. Exactness is tested in tests/test_bank_index.py;
this measures the work it saves, and the time against the plain search on the same queries.

    python benchmarks/bank_index_pruning.py --data ../shared/data/mvtec_ad/bottle -o pruning.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.core.knn import nearest
from patchcore.io.images import as_uint8_tensor, list_images, read_image

CASES = {
    "224 (MVTec crop), 10%": dict(coreset_ratio=0.1),
    "native 896 by tiles, 1%": dict(resize=896, crop=None, tile_size=448, tile_overlap=128, coreset_ratio=0.01),
}


def measure(name: str, overrides: dict, train: list[Path], tests: list[Path]) -> dict:
    config = PatchCoreConfig(backbone="efficientnet_lite0", calibration_ratio=0.0, **overrides)
    model = PatchCore(config, device="cpu").fit(train)
    index = model.bank_index
    queries = []
    for path in tests:
        embedding = model.embed(as_uint8_tensor(read_image(path))[None])
        queries.append(embedding.features[0])
    queries = torch.cat(queries)
    index.reset_stats()
    started = time.perf_counter()
    dist, idx = index.search(queries)
    pruned_s = time.perf_counter() - started
    stats = dict(index.stats_)
    started = time.perf_counter()
    plain_dist, plain_idx = nearest(queries, index.bank_, 1)
    plain_s = time.perf_counter() - started
    result = {"bank": list(index.bank_.shape), "queries": queries.shape[0], "pruning_on": index.pruning_,
              "pruned_share": 1 - (stats["candidates"] + stats["plain"]) / stats["pairs"],
              "exact_share": stats["exact"] / stats["pairs"], "search_s": pruned_s, "plain_search_s": plain_s,
              "same_distances": bool(torch.allclose(dist, plain_dist[:, 0], rtol=1e-5, atol=1e-5)),
              "fit_s": model.fit_report_.embed_seconds + model.fit_report_.coreset_seconds}
    print(name, json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad/bottle"))
    parser.add_argument("--only", default=None)
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    train = list_images(args.data / "train" / "good")
    tests = list_images(args.data / "test", recursive=True)[::4]  # 21 test images, every type
    results = {name: measure(name, overrides, train, tests) for name, overrides in CASES.items()
               if args.only is None or args.only in name}
    print(json.dumps(results, indent=1))
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
