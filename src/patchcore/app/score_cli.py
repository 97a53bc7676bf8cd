"""`patchcore-score`: score image files on a line PC without torch (patchcore.runtime).

    patchcore-score bottle.model IMAGE_OR_DIR... [--export bottle.model.onnx] [-o scores.csv] [--backend openvino]

Writes one CSV row per file (file, score, label, max pixel score) to -o (default: stdout), names every file
that could not be read on stderr, and exits 1 when there was one (0: all scored; 2: a usage, model or
export error). Imports nothing of the estimator: this is the command the runtime-only install has.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ..errors import PatchCoreError
from ..io.images import expand_inputs
from ..runtime import BACKENDS, Runtime
from ..runtime.bundle import default_export_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore-score", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model file from `patchcore fit`")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--export", default=None, help="export folder from `patchcore export` (default: MODEL.onnx)")
    parser.add_argument("-o", "--output", default=None, help="CSV file to write (default: standard output)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                        help="fp32 (default); bf16 (OpenVINO) and int8 change the scores (docs/RUNTIME.md)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    export = Path(args.export) if args.export else default_export_dir(args.model)
    failures = 0
    try:
        runtime = Runtime.load(args.model, export, backend=args.backend, threads=args.threads,
                               precision=args.precision)
        paths = expand_inputs(args.inputs)
        with (open(args.output, "w", newline="") if args.output else sys.stdout) as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "score", "label", "max_pixel_score"])
            for batch in runtime.iter_predict(paths):
                for failure in batch.failures:
                    failures += 1
                    print(f"patchcore-score: {failure}", file=sys.stderr)
                if batch.result is None:
                    continue
                labels = batch.result.labels
                for i, path in enumerate(batch.paths):
                    label = "" if labels is None else ("defect" if labels[i] else "good")
                    writer.writerow([str(path), f"{float(batch.result.scores[i]):.6g}", label,
                                     f"{float(batch.result.maps[i].max()):.6g}"])
    except PatchCoreError as err:
        print(f"patchcore-score: error: {err}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
