"""Command line: `patchcore fit | predict | demo | evaluate | bench`.

Model options are generated from PatchCoreConfig's fields (app/options.py), so the CLI cannot drift from
the model. Exit status: 0 done; 1 done, but some input files could not be read (listed at the end);
2 a user error (bad input, model file, weights or option), printed as one line; 3 an internal error
(a bug, out of memory, ...), printed with its traceback; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM,
handled like Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from .._version import __version__
from ..config import PatchCoreConfig
from ..errors import ConfigError, PatchCoreError
from ..estimator import PatchCore
from ..estimator.ensemble import build_model, is_ensemble_config, load_model
from ..evaluation.bench import format_table, run_bench
from ..evaluation.evaluate import PIXEL_RESOLUTIONS, evaluate
from ..evaluation.metrics import auroc
from ..evaluation.synthetic import make_category
from ..io.images import expand_inputs
from ..io.model_file import atomic_write_bytes, check_output_file
from .options import add_config_options, config_from_args, finite_float, non_negative_float, positive_int
from .predict_folder import check_output_folder, collect_inputs, predict_to_folder
from .progress import progress_bars
from .ray_commands import add_parsers as add_ray_parsers
from .ray_commands import add_ray_options, cmd_predict_on_ray, estimator, ray_session
from .server_commands import add_parsers as add_server_parsers

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


# ---------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # Before any work: a folder, a file in the way or a read-only folder is an error now, not after the fit.
    output = check_output_file(args.output)
    paths = expand_inputs(args.train)
    print(f"fitting {config.backbone} on {len(paths)} images (coreset "
          f"{config.coreset_size or config.coreset_ratio}, device {args.device})", file=sys.stderr)
    started = time.perf_counter()
    if is_ensemble_config(config) and getattr(args, "ray", None) is not None:
        raise ConfigError("--ray fits one backbone; fit an ensemble (--backbone a,b) without --ray")
    with progress_bars(args.quiet)(len(paths), "fit") as bar, ray_session(args):  # --ray: features in Ray tasks
        # --backbone a,b,c: an ensemble (docs/ENSEMBLE.md)
        model = build_model(config, device=args.device) if is_ensemble_config(config) else estimator(args, config)
        model = model.fit(
            paths, progress=bar.update, max_feature_memory=int(args.max_feature_memory_gb * (1 << 30)))
    model.save(output)  # atomic: a failure or Ctrl-C leaves no partial file and any previous model intact
    report = model.fit_report_
    print(f"wrote {output}: bank {tuple(model.memory_bank_.shape)} from {report.n_patches} patches of "
          f"{report.n_images} images; fit {time.perf_counter() - started:.1f} s "
          f"(features {report.embed_seconds:.1f} s, "
          f"coreset {report.coreset_seconds:.1f} s)", file=sys.stderr)
    print(f"working geometry: {report.geometry}", file=sys.stderr)
    if model.image_threshold_ is not None:
        print(f"decision threshold {model.image_threshold_:.4g} (image), {model.pixel_threshold_:.4g} (pixel): "
              f"{report.thresholds}", file=sys.stderr)
        if report.suspects:  # a line wants to look at these: "good" sets often hold a few parts that are not
            print(f"{len(report.suspects)} training image(s) score like defects against the others (score > "
                  f"threshold); look at them, and refit without the bad ones or with --exclude-outliers true:",
                  file=sys.stderr)
            for name, score in report.suspects:
                print(f"  {name}  {score:.4g}", file=sys.stderr)
    else:
        print("no decision threshold (fewer than 10 training images): predict writes scores and heatmaps but no "
              "good/defect labels", file=sys.stderr)
    if report.skipped:  # the model is written, but not from every image given: exit 1 says so
        print(f"{len(report.skipped)} training image(s) could not be read and were skipped:", file=sys.stderr)
        for failure in report.skipped:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    if args.ray is not None:  # Ray Data batch scoring into Parquet; resumes its own stopped run (docs/CLUSTER.md)
        return cmd_predict_on_ray(args, collect_inputs(args.inputs, exclude=Path(args.output)))
    output = Path(args.output)
    check_output_folder(output, overwrite=args.overwrite)  # before any work; removes nothing
    model = load_for_runtime(args)
    # Each threshold is on its own scale (image scores vs pixel scores): one never stands in for the other.
    model.with_thresholds(image=args.threshold, pixel=args.pixel_threshold)
    paths = collect_inputs(args.inputs, exclude=output)
    rows, failures = predict_to_folder(model, paths, output, progress=progress_bars(args.quiet),
                                       save_maps=args.save_maps, overwrite=args.overwrite,
                                       full_resolution=args.full_resolution)
    print(f"scored {len(rows)} images -> {output}/scores.csv, heatmaps in {output}/heatmaps, "
          f"overlays in {output}/overlays", file=sys.stderr)
    if failures:
        print(f"{len(failures)} file(s) could not be read or scored:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def load_for_runtime(args: argparse.Namespace) -> PatchCore:
    """The model of `predict` / `update`: scored by torch, or by the exported graph (--runtime onnx)."""
    if getattr(args, "runtime", "torch") == "onnx":
        from ..estimator.exported import ExportedPatchCore

        return ExportedPatchCore.load(args.model, weights=args.weights, export_dir=args.export,
                                      backend=args.backend, threads=args.threads, precision=args.precision)
    return load_model(args.model, device=args.device, weights=args.weights)  # a single model or an ensemble


def cmd_export(args: argparse.Namespace) -> int:
    from ..estimator.export import export_model, quantize_int8
    from ..estimator.exported import default_export_dir

    output = Path(args.output) if args.output else default_export_dir(args.model)
    model = PatchCore.load(args.model, device="cpu", weights=args.weights)
    checks = expand_inputs(args.check_images) if args.check_images else None
    print(f"exporting {model.config.backbone} to {output} (ONNX opset 18) ...", file=sys.stderr)
    report = export_model(model, args.model, output, check_images=checks, static_size=args.static_size)
    sizes = "dynamic" if report.dynamic_size else "fixed"
    print(f"wrote {output}/embedding.onnx ({report.graph_bytes / 1e6:.1f} MB, {sizes} height and width) in "
          f"{report.export_seconds:.0f} s; checked on {report.checked_images} images: image "
          f"scores within {report.max_score_rel_diff:.1e} relative of the library's, maps within "
          f"{report.max_map_rel_diff:.1e}, labels {'identical' if report.labels_equal else 'DIFFERENT'}",
          file=sys.stderr)
    if args.int8:
        variant = quantize_int8(args.model, output, expand_inputs(args.int8))
        print(f"wrote {output}/{variant['graph']} (static int8, calibrated on {variant['calibration_images']} "
              f"images): an explicit accuracy trade, scored only with --precision int8", file=sys.stderr)
    return EXIT_OK


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="torch: the library; onnx: the graph written by `patchcore export` (docs/RUNTIME.md)")
    p.add_argument("--export", default=None, help="export folder for --runtime onnx (default: MODEL.onnx)")
    p.add_argument("--backend", choices=["onnxruntime", "onnxruntime-cuda", "openvino"], default="onnxruntime",
                   help="engine for --runtime onnx (default onnxruntime, CPU)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads of one scoring process: the engine's with --runtime onnx (default: all cores), "
                        "torch's per actor with --ray (default: the cluster's CPUs / actors)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="fp32 (default); bf16 (--backend openvino) or int8 (the graph of export --int8): explicit "
                        "accuracy trades, measured in docs/RUNTIME.md")


def cmd_demo(args: argparse.Namespace) -> int:
    root = Path(args.output)
    data = make_category(root / "data", seed=args.seed)
    print(f"made a synthetic inspection set in {data} (MVTec layout: train/good, test/<type>, ground_truth)",
          file=sys.stderr)
    config = PatchCoreConfig(backbone=args.backbone, resize=128, crop=None, coreset_ratio=0.1, seed=args.seed)
    model = PatchCore(config, device=args.device).fit(expand_inputs([data / "train" / "good"]))
    model.save(root / "demo.model")
    tests = sorted((data / "test").glob("*/*.png"))
    rows, failures = predict_to_folder(model, tests, root / "predictions", progress=progress_bars(args.quiet))
    labels = [0 if Path(r["file"]).parent.name == "good" else 1 for r in rows]
    score = auroc(labels, [r["score"] for r in rows])
    print(f"model: {root / 'demo.model'}\nimage AUROC on the synthetic test set: {score:.3f}\n"
          f"heatmaps: {root / 'predictions' / 'heatmaps'}\noverlays: {root / 'predictions' / 'overlays'}\n"
          f"scores:   {root / 'predictions' / 'scores.csv'}", file=sys.stderr)
    return _report_failures(failures)


def cmd_evaluate(args: argparse.Namespace) -> int:
    output = Path(args.output)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    run = evaluate(args.root, config_from_args(args), output, categories=args.category, train=args.train,
                   device=args.device, max_feature_memory=int(args.max_feature_memory_gb * (1 << 30)),
                   progress=progress_bars(args.quiet), log=log, pixel_resolution=args.pixel_resolution,
                   report=not args.no_report)
    report = "" if args.no_report or not (output / "report.html").is_file() else f", {output / 'report.html'}"
    log(f"wrote {output / 'results.md'}, {output / 'summary.json'}{report} and one JSON per category in {output}")
    if not run.partial:
        return EXIT_OK
    # As fit: the results are written, but they do not cover every image or category given.
    for failure in run.failed:
        log(f"category {failure['category']} failed: {failure['error']}")
    for record in run.records:
        failures = record["failures"]
        if failures["train_images"]:
            log(f"{record['category']}: {len(failures['train_images'])} training image(s) could not be read and "
                "were skipped: " + "; ".join(failures["train_images"]))
        if failures["test_images"]:
            log(f"{record['category']}: {len(failures['test_images'])} test image(s) could not be read or scored: "
                + "; ".join(failures["test_images"]))
    log("the results are partial (exit 1)" if not any(f["internal"] for f in run.failed)
        else f"the results are partial; a category failed with an internal error (exit {EXIT_INTERNAL})")
    return EXIT_INTERNAL if any(f["internal"] for f in run.failed) else EXIT_SOME_FAILED


def cmd_bench(args: argparse.Namespace) -> int:
    output = check_output_file(args.output) if args.output else None  # a folder there fails now, not after the run
    result = run_bench(Path(args.data), config_from_args(args), device=args.device,
                       throughput_batch=args.throughput_batch, progress=progress_bars(args.quiet))
    print(format_table(result), file=sys.stderr)
    if output is not None:
        atomic_write_bytes(output, json.dumps(result, indent=1).encode())  # OSError -> one-line OutputError
    return EXIT_OK


def _report_failures(failures) -> int:
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} file(s) could not be read:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_SOME_FAILED


# ---------------------------------------------------------------------------- parser



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto picks cuda when present (default: auto)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    def feature_memory(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-feature-memory-gb", type=non_negative_float, default=1.0,
                       help="training features beyond this go to a temporary file (default: 1)")

    fit = sub.add_parser("fit", help="build a model from folders or files of good images")
    fit.add_argument("train", nargs="+", help="folders (their images) or image files, all defect-free")
    fit.add_argument("-o", "--output", required=True,
                     help="model file to write (replaced atomically if it exists; missing folders are created). "
                          "Checked before the fit starts: a folder, or a folder that cannot be written, is an error")
    feature_memory(fit)
    add_ray_options(fit, "fit")
    common(fit)
    add_config_options(fit)
    fit.set_defaults(run=cmd_fit)

    predict = sub.add_parser("predict", help="score images: scores, heatmaps, overlays, masks")
    predict.add_argument("model", help="model file from `patchcore fit`")
    predict.add_argument("inputs", nargs="+",
                         help="image files or folders; folders are searched recursively (an MVTec test/ folder of "
                              "per-type subfolders works). Outputs are named by the path below the common folder "
                              "of all inputs, '/' -> '_' (test/crack/000.png -> crack_000); a name already taken "
                              "gets _2, _3, ...; a file given twice is scored once")
    predict.add_argument("-o", "--output", required=True,
                         help="output folder: scores.csv (written as it goes), scores.json (status complete, "
                              "interrupted or failed), heatmaps/, overlays/, masks/. A folder with results of an "
                              "earlier run is refused unless --overwrite")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace the results of an earlier run in the output folder (they are removed "
                              "first, so old and new never mix; other files there stay)")
    predict.add_argument("--weights", default=None, help="local backbone weights file, if the model's is elsewhere")
    predict.add_argument("--threshold", type=finite_float, default=None,
                         help="image decision threshold on the image-score scale: labels are 'defect' when the "
                              "score is above it (default: the model's, calibrated at fit); the pixel threshold "
                              "for masks is separate, see --pixel-threshold")
    predict.add_argument("--pixel-threshold", type=finite_float, default=None,
                         help="pixel threshold for the defect masks, on the pixel-score scale of the maps "
                              "(default: the model's, calibrated at fit)")
    predict.add_argument("--save-maps", action="store_true", help="also write raw float32 maps as .npy")
    add_runtime_options(predict)
    predict.add_argument("--full-resolution", action="store_true",
                         help="heatmaps, overlays, masks and maps at each input image's own size (the resize and "
                              "crop undone): pixels the model never saw are grey, 128 in masks, NaN in maps "
                              "(default: at the model input geometry)")
    add_ray_options(predict, "predict")
    common(predict)
    predict.set_defaults(run=cmd_predict)

    export = sub.add_parser("export", help="write the embedding as an ONNX graph for the torch-free runtime")
    export.add_argument("model", help="model file from `patchcore fit`")
    export.add_argument("-o", "--output", default=None, help="export folder (default: MODEL.onnx)")
    export.add_argument("--weights", default=None, help="local backbone weights file, if the model's is elsewhere")
    export.add_argument("--check-images", nargs="+", default=None,
                        help="images (files or folders) scored through both paths to check the export "
                             "(default: a few synthetic images)")
    export.add_argument("--static-size", action="store_true",
                        help="a graph for the training input size only (where the geometry allows other sizes: "
                             "a faster export; images of other model-input sizes are then refused)")
    export.add_argument("--int8", nargs="+", default=None, metavar="TRAIN_IMAGES",
                        help="also write a static int8 graph, calibrated on these training images (files or folders)")
    export.set_defaults(run=cmd_export)

    demo = sub.add_parser("demo", help="make a synthetic inspection set, fit, predict, show where results are")
    demo.add_argument("-o", "--output", default="patchcore-demo",
                      help="folder for everything (default: patchcore-demo)")
    demo.add_argument("--backbone", default="efficientnet_lite0", help="default: efficientnet_lite0 (offline weights)")
    demo.add_argument("--seed", type=int, default=0)
    common(demo)
    demo.set_defaults(run=cmd_demo)

    evaluate_parser = sub.add_parser(
        "evaluate", help="fit and score MVTec-layout (or folder-layout) categories; write metrics",
        description="Fit on each category's training images, score its test images, and write image AUROC, "
                    "pixel AUROC, AUPRO and F1-max per category and their mean (JSON and Markdown).")
    evaluate_parser.add_argument("root", help="a category folder, or a folder of categories (e.g. the MVTec AD root)")
    evaluate_parser.add_argument("--category", action="append", default=None,
                                 help="evaluate only this category (repeatable; default: all found)")
    evaluate_parser.add_argument("-o", "--output", default="results", help="results folder (default: results)")
    evaluate_parser.add_argument("--train", default=None,
                                 help="folder of defect-free training images, for a single category without "
                                      "<category>/train/good (folder layout)")
    evaluate_parser.add_argument("--pixel-resolution", choices=PIXEL_RESOLUTIONS, default="original",
                                 help="where pixel metrics are computed: 'original' = each image's own size, as "
                                      "the MVTec protocol (pixels outside the crop count as not flagged); 'model' "
                                      "= the model input geometry, masks resized to it (default: original)")
    evaluate_parser.add_argument("--no-report", action="store_true",
                                 help="do not write report.html (curves, histograms, gallery; needs the "
                                      "'report' extra: pip install 'patchcore[report]')")
    feature_memory(evaluate_parser)
    common(evaluate_parser)
    add_config_options(evaluate_parser)
    evaluate_parser.set_defaults(run=cmd_evaluate)

    bench = sub.add_parser("bench", help="time fit and predict, measure peak memory (and AUROC on MVTec data)")
    bench.add_argument("data", help="a category folder in a layout `evaluate` reads (MVTec: train/good, test/, "
                                    "ground_truth/)")
    bench.add_argument("-o", "--output", default=None, help="write the results as JSON here")
    bench.add_argument("--throughput-batch", type=positive_int, default=32,
                       help="batch for the throughput run (default 32)")
    common(bench)
    add_config_options(bench)
    bench.set_defaults(run=cmd_bench)
    add_server_parsers(sub, common)
    add_ray_parsers(sub, common, add_config_options)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `kill`, a container stop), handled exactly like Ctrl-C: temporary files
    removed, scores.json says "interrupted" (error: "terminated by SIGTERM"); exit status 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # `serve`: uvicorn installs its own while it runs
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.run(args)
    except PatchCoreError as err:  # the user's input: one clean line
        print(f"patchcore {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated:
        print(f"patchcore {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"patchcore {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # a bug or the environment (out of memory, full disk): keep the traceback
        traceback.print_exc()
        print(f"patchcore {args.command}: internal error (exit {EXIT_INTERNAL}); the traceback above says where",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
