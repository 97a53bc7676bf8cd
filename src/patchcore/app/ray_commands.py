"""The command line's Ray options: `predict --ray`, `fit --ray` and `fit-many` (docs/CLUSTER.md).

Ray is an optional extra: this module does not import it; the engine modules (ray_predict, ray_fit) are
imported only when a Ray option is used, and a missing extra is one clear line, exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from ..errors import InputError
from ..estimator import PatchCore


def _engine(name: str):
    try:
        if name == "predict":
            from . import ray_predict as module
        else:
            from . import ray_fit as module
        from . import ray_cluster
    except ImportError as err:
        raise InputError(f"running on Ray needs the 'ray' extra: pip install 'patchcore[ray]' ({err})") from None
    return module, ray_cluster


def add_ray_options(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("on a Ray cluster (pip install 'patchcore[ray]'; docs/CLUSTER.md)")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray: a local instance on this machine, or the cluster at ADDRESS "
                            "(host:port, or 'auto' inside a cluster)")
    group.add_argument("--ray-cpus", type=int, default=None,
                       help="CPUs of the local Ray instance (default: all of this machine's)")
    if command == "predict":
        group.add_argument("--actors", type=int, default=1, help="scoring actors, each with the model loaded once "
                                                                 "(default 1)")
        # --threads (threads per actor; default: the cluster's CPUs / actors) is predict's own option, shared
        # with --runtime onnx: one option, one meaning (threads of one scoring process).
        group.add_argument("--chunk-size", type=int, default=64,
                           help="images per chunk: the unit of work, retry and output file (default 64)")
        group.add_argument("--decode", choices=["actor", "tasks"], default="actor",
                           help="where images are decoded: in each actor's threads while it scores (default; no "
                                "pixels cross processes), or in Ray tasks feeding the actors (GPU actors)")
        group.add_argument("--pictures", action="store_true",
                           help="also write heatmaps, overlays and masks (as without --ray); default: Parquet only")
    else:
        group.add_argument("--chunk-images", type=int, default=None,
                           help="training images per feature task (whole batches; default: about two tasks per CPU)")


def ray_session(args: argparse.Namespace):
    """A RaySession for --ray, or nothing."""
    if getattr(args, "ray", None) is None:
        return contextlib.nullcontext()
    _, cluster = _engine("fit")
    return cluster.RaySession(args.ray, num_cpus=args.ray_cpus)


def estimator(args: argparse.Namespace, config) -> PatchCore:
    """The estimator `fit` uses: RayPatchCore with --ray (features extracted in Ray tasks), else PatchCore."""
    if getattr(args, "ray", None) is None:
        return PatchCore(config, device=args.device)
    module, _ = _engine("fit")
    return module.RayPatchCore(config, device=args.device, chunk_images=args.chunk_images)


def cmd_predict_on_ray(args: argparse.Namespace, inputs: list[Path]) -> int:
    module, _ = _engine("predict")
    paths: list[Path] = []
    for item in inputs:
        if item.suffix.lower() in (".csv", ".parquet") and item.is_file():
            paths += module.read_manifest(item)
        else:
            paths.append(item)
    backend, options = "torch", {}
    if getattr(args, "runtime", "torch") == "onnx":  # the lean runtime's graph in every actor
        # Scores only: torch-free actors (start in a fraction of the time); pictures: the graph behind the
        # estimator's API, which draws them as `predict --runtime onnx` does.
        backend = "onnx" if args.pictures else "runtime"
        options = {"export_dir": args.export, "engine": args.backend, "precision": args.precision}
    report = module.predict_on_ray(
        args.model, paths, args.output, address=args.ray, num_cpus=args.ray_cpus, actors=args.actors,
        threads=args.threads, chunk_size=args.chunk_size, device="cuda" if args.device == "cuda" else "cpu",
        backend=backend, backend_options=options, decode=args.decode,
        image_threshold=args.threshold, pixel_threshold=args.pixel_threshold, pictures=args.pictures,
        save_maps=args.save_maps, full_resolution=args.full_resolution, overwrite=args.overwrite)
    print(f"scored {report.n_scored} of {report.n_inputs} images on Ray ({report.actors} actor(s), "
          f"{report.n_already_done} already done by an earlier run) in {report.seconds:.1f} s -> "
          f"{args.output}/scores/*.parquet, {args.output}/summary.json", file=sys.stderr)
    if report.n_failed:
        print(f"{report.n_failed} file(s) could not be read or scored (rows with an error):", file=sys.stderr)
        for failure in report.failures[:20]:
            print(f"  {failure['file']}: {failure['error']}", file=sys.stderr)
        return 1
    return 0


def cmd_fit_many(args: argparse.Namespace) -> int:
    from .options import config_from_args

    module, cluster = _engine("fit")
    config = config_from_args(args)

    def show(row: dict) -> None:
        print(f"{row['category']}: {row['status']}" + (f" ({row['error'].splitlines()[0]})" if row.get("error") else
                                                       f", {row.get('seconds')} s"), file=sys.stderr)

    with cluster.RaySession(args.ray, num_cpus=args.ray_cpus):
        rows = module.fit_many_on_ray(args.root, args.output, config, device=args.device, categories=args.category,
                                      threads=args.threads, on_row=show)
    print(module.summary_table(rows), file=sys.stderr)
    print(f"models and summary.csv / summary.md / summary.json in {args.output}", file=sys.stderr)
    return 0 if all(r["status"] == "fitted" for r in rows) else 1


def add_parsers(sub, common, add_config_options) -> None:
    many = sub.add_parser("fit-many", help="fit one model per category folder, as Ray tasks, with a summary table")
    many.add_argument("root", help="a folder of category folders (<name>/train/good, MVTec, or <name>/*.png)")
    many.add_argument("-o", "--output", required=True, help="folder for <category>.model and summary.csv/.md/.json")
    many.add_argument("--category", action="append", default=None, help="only this category (repeatable)")
    many.add_argument("--ray", default="local", metavar="ADDRESS",
                      help="the Ray cluster (default: a local instance on this machine)")
    many.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    many.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per fit (default 1)")
    common(many)
    add_config_options(many)
    many.set_defaults(run=cmd_fit_many)
