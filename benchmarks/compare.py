#!/usr/bin/env python3
"""Table of side_by_side.sh results: medians per implementation and our/anomalib ratios.

    python benchmarks/compare.py results/side_by_side 0.1
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(folder: Path, prefix: str, ratio: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{prefix}_{ratio}_*.json"))]


def main() -> int:
    folder, ratio = Path(sys.argv[1]), sys.argv[2]
    ours, peer = load(folder, "ours", ratio), load(folder, "anomalib", ratio)
    if not ours or not peer:
        print(f"need ours_{ratio}_*.json and anomalib_{ratio}_*.json in {folder}", file=sys.stderr)
        return 2
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    rows = [
        ("fit s", med(ours, "fit_s"), med(peer, "fit_s")),
        ("of which coreset s", med(ours, "fit_coreset_s"), med(peer, "coreset_s")),
        ("predict ms/img (from files)", med(ours, "predict_ms_per_image_from_files"),
         1000 * med(peer, "predict_s_per_image")),
        ("peak RSS MiB during fit", med(ours, "peak_rss_after_fit_mib"), med(peer, "peak_rss_after_fit_mib")),
        ("image AUROC", med(ours, "image_auroc"), med(peer, "image_auroc")),
        ("pixel AUROC", med(ours, "pixel_auroc"), med(peer, "pixel_auroc")),
    ]
    print(f"| coreset {ratio} ({len(ours)} + {len(peer)} runs, medians) | patchcore | anomalib 2.7 | ours / anomalib |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        digits = 4 if "AUROC" in name else 1
        print(f"| {name} | {a:.{digits}f} | {b:.{digits}f} | {a / b:.3f} |")
    summary = {name: {"patchcore": a, "anomalib": b, "ratio": a / b} for name, a, b in rows}
    (folder / f"compare_{ratio}.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
