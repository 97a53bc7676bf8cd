"""Command line: `patchcore fit | predict | demo | evaluate | bench`.

Model options are generated from PatchCoreConfig's fields, so the CLI cannot drift from the model.
Exit status: 0 done; 1 done, but some input files could not be read (listed at the end); 2 error.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
import typing
from pathlib import Path

from .config import PatchCoreConfig

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


# ---------------------------------------------------------------------------- config <-> argparse
def _parse_size(text: str) -> int | tuple[int, int] | None:
    text = text.strip().lower()
    if text in ("none", "0", ""):
        return None
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"expected N or H,W, got {text!r}")


def _parse_int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(","))


def _parse_optional(kind):
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    return parse


_SPECIAL_PARSERS = {"resize": _parse_size, "crop": _parse_size, "feature_strides": _parse_int_tuple}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One --option per PatchCoreConfig field, with the field's default and help."""
    group = parser.add_argument_group("model options (saved in the model file)")
    hints = typing.get_type_hints(PatchCoreConfig)
    for f in dataclasses.fields(PatchCoreConfig):
        parse = _SPECIAL_PARSERS.get(f.name)
        if parse is None:
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            base = args[0] if args else hint
            parse = _parse_optional(base) if type(None) in typing.get_args(hint) else base
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse, default=argparse.SUPPRESS,
                           help=f"{f.metadata.get('help', '')} (default: {shown})")


def config_from_args(args: argparse.Namespace, base: PatchCoreConfig | None = None) -> PatchCoreConfig:
    names = {f.name for f in dataclasses.fields(PatchCoreConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return dataclasses.replace(base or PatchCoreConfig(), **given)


# ---------------------------------------------------------------------------- commands
def cmd_fit(args: argparse.Namespace) -> int:
    from .images import expand_inputs
    from .model import PatchCore

    config = config_from_args(args)
    paths = expand_inputs(args.train)
    print(f"fitting {config.backbone} on {len(paths)} images (coreset "
          f"{config.coreset_size or config.coreset_ratio}, device {args.device})", file=sys.stderr)
    started = time.perf_counter()
    with progress_bar(len(paths), "fit", args.quiet) as bar:
        model = PatchCore(config, device=args.device).fit(
            paths, progress=bar.update, max_feature_memory=int(args.max_feature_memory_gb * (1 << 30)))
    model.save(args.output)
    report = model.fit_report_
    print(f"wrote {args.output}: bank {tuple(model.memory_bank_.shape)} from {report.n_patches} patches of "
          f"{report.n_images} images; fit {time.perf_counter() - started:.1f} s (features {report.embed_seconds:.1f} s, "
          f"coreset {report.coreset_seconds:.1f} s)", file=sys.stderr)
    if model.image_threshold_ is not None:
        print(f"decision threshold {model.image_threshold_:.4g} (image), {model.pixel_threshold_:.4g} (pixel), "
              f"from {report.n_calibration_images} held-out training images", file=sys.stderr)
    else:
        print("no decision threshold (fewer than 10 training images or --calibration-ratio 0): "
              "predict writes scores and heatmaps but no good/defect labels", file=sys.stderr)
    for failure in report.skipped:
        print(f"skipped unreadable training image: {failure}", file=sys.stderr)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from .images import expand_inputs
    from .model import PatchCore

    model = PatchCore.load(args.model, device=args.device, weights=args.weights)
    if args.threshold is not None:
        model.image_threshold_ = args.threshold
        model.pixel_threshold_ = model.pixel_threshold_ or args.threshold
    paths = expand_inputs(args.inputs)
    rows, failures = predict_to_folder(model, paths, Path(args.output), quiet=args.quiet, save_maps=args.save_maps)
    print(f"scored {len(rows)} images -> {args.output}/scores.csv, heatmaps in {args.output}/heatmaps, "
          f"overlays in {args.output}/overlays", file=sys.stderr)
    return _report_failures(failures)


def predict_to_folder(model, paths: list[Path], output: Path, *, quiet: bool = False, save_maps: bool = False):
    """Score `paths` batch by batch and write heatmaps, overlays, masks and the scores table."""
    import numpy as np
    from PIL import Image

    from .visualize import colormap, normalise_map, overlay

    names = output_names(paths)
    for sub in ("heatmaps", "overlays") + (("masks",) if model.image_threshold_ is not None else ()) + (("maps",) if save_maps else ()):
        (output / sub).mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    with progress_bar(len(paths), "predict", quiet) as bar:
        for batch in model.iter_predict(paths):
            failures += batch.failures
            bar.update(len(batch.paths) + len(batch.failures))
            result = batch.result
            for i, path in enumerate(batch.paths):
                name = names[path]
                anomaly_map = result.maps[i].numpy()
                heat = colormap(normalise_map(anomaly_map, model.pixel_threshold_))
                Image.fromarray(heat).save(output / "heatmaps" / f"{name}.png")
                picture = model.preprocess.geometry(batch.images[i]).permute(1, 2, 0).numpy()
                mask = None if result.masks is None else result.masks[i].numpy()
                Image.fromarray(overlay(picture, heat, mask)).save(output / "overlays" / f"{name}.png")
                if mask is not None:
                    Image.fromarray((mask * 255).astype(np.uint8)).save(output / "masks" / f"{name}.png")
                if save_maps:
                    np.save(output / "maps" / f"{name}.npy", anomaly_map)
                label = "" if result.labels is None else ("defect" if bool(result.labels[i]) else "good")
                rows.append({"file": str(path), "name": name, "score": float(result.scores[i]), "label": label})
    write_scores(output, rows, model, failures)
    return rows, failures


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Unique, readable output names: the path below the inputs' common folder, '/' -> '_'
    (MVTec's test/crack/000.png and test/good/000.png become crack_000 and good_000)."""
    import os

    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if resolved else Path(".")
    names, used = {}, set()
    for path, full in zip(paths, resolved):
        base = "_".join(full.relative_to(common).with_suffix("").parts)
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names[path] = name
    return names


def write_scores(output: Path, rows: list[dict], model, failures) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "name", "score", "label"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {"image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_,
               "map_geometry": {"input_size": list(model.input_size_), "resize": model.config.resize,
                                "crop": model.config.crop},
               "images": rows, "failures": [{"file": f.path, "error": f.reason} for f in failures]}
    (output / "scores.json").write_text(json.dumps(summary, indent=1))


def cmd_demo(args: argparse.Namespace) -> int:
    from .images import expand_inputs
    from .metrics import auroc
    from .model import PatchCore
    from .synthetic import make_category

    root = Path(args.output)
    data = make_category(root / "data", seed=args.seed)
    print(f"made a synthetic inspection set in {data} (MVTec layout: train/good, test/<type>, ground_truth)",
          file=sys.stderr)
    config = PatchCoreConfig(backbone=args.backbone, resize=128, crop=None, coreset_ratio=0.1, seed=args.seed)
    model = PatchCore(config, device=args.device).fit(expand_inputs([data / "train" / "good"]))
    model.save(root / "demo.model")
    tests = sorted((data / "test").glob("*/*.png"))
    rows, failures = predict_to_folder(model, tests, root / "predictions", quiet=args.quiet)
    labels = [0 if Path(r["file"]).parent.name == "good" else 1 for r in rows]
    score = auroc(labels, [r["score"] for r in rows])
    print(f"model: {root / 'demo.model'}\nimage AUROC on the synthetic test set: {score:.3f}\n"
          f"heatmaps: {root / 'predictions' / 'heatmaps'}\noverlays: {root / 'predictions' / 'overlays'}\n"
          f"scores:   {root / 'predictions' / 'scores.csv'}", file=sys.stderr)
    return _report_failures(failures)


def _report_failures(failures) -> int:
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} file(s) could not be read:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_SOME_FAILED


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr when it is a terminal; a no-op when quiet."""
    if quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)  # None: off when not a TTY


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore", description=__doc__.split("\n")[0])
    from . import __version__
    parser.add_argument("--version", action="version", version=f"patchcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="auto picks cuda when present (default: auto)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    fit = sub.add_parser("fit", help="build a model from folders or files of good images")
    fit.add_argument("train", nargs="+", help="folders (their images) or image files, all defect-free")
    fit.add_argument("-o", "--output", required=True, help="model file to write")
    fit.add_argument("--max-feature-memory-gb", type=float, default=1.0,
                     help="training features beyond this go to a temporary file (default: 1)")
    common(fit)
    add_config_options(fit)
    fit.set_defaults(run=cmd_fit)

    predict = sub.add_parser("predict", help="score images: scores, heatmaps, overlays, masks")
    predict.add_argument("model", help="model file from `patchcore fit`")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("-o", "--output", required=True, help="output folder")
    predict.add_argument("--weights", default=None, help="local backbone weights file, if the model's is elsewhere")
    predict.add_argument("--threshold", type=float, default=None, help="override the image decision threshold")
    predict.add_argument("--save-maps", action="store_true", help="also write raw float32 maps as .npy")
    common(predict)
    predict.set_defaults(run=cmd_predict)

    demo = sub.add_parser("demo", help="make a synthetic inspection set, fit, predict, show where results are")
    demo.add_argument("-o", "--output", default="patchcore-demo", help="folder for everything (default: patchcore-demo)")
    demo.add_argument("--backbone", default="efficientnet_lite0", help="default: efficientnet_lite0 (offline weights)")
    demo.add_argument("--seed", type=int, default=0)
    common(demo)
    demo.set_defaults(run=cmd_demo)

    for extra in ("evaluate", "bench"):
        module = __import__(f"patchcore.{extra}", fromlist=["add_parser"])
        module.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .backbones import WeightsUnavailableError
    from .images import ImageReadError
    from .model_file import ModelFileError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ImageReadError, ModelFileError, WeightsUnavailableError, ValueError, RuntimeError) as err:
        print(f"patchcore {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
