"""`patchcore serve` (HTTP API and inspection page) and `patchcore update` (add good images to a model)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..errors import InputError
from ..estimator.ensemble import load_model
from ..io.images import expand_inputs
from ..io.model_file import check_output_file
from .options import non_negative_float, non_negative_int, positive_finite_float, positive_int
from .server.versions import real_model_path, save_keeping_previous


def cmd_update(args: argparse.Namespace) -> int:
    # Before any work: a folder, a symlink loop or a folder that cannot be written is an error now.
    check_output_file(args.output)
    model = load_model(args.model, device=args.device, weights=args.weights)  # a single model or an ensemble
    paths = expand_inputs(args.images)
    before = model.memory_bank_.shape[0]
    model.update(paths, max_new=args.max_new, radius=args.radius)
    output = Path(args.output)
    report = model.update_report_
    for failure in report.skipped:
        print(f"skipped image: {failure}", file=sys.stderr)
    if report.bank_after == before and output.exists() and os.path.samefile(output, args.model):
        print(f"{output} unchanged: every new patch is already within the coverage radius "
              f"{report.radius:.4g} of the bank ({report.n_patches} patches of {report.n_images} images)",
              file=sys.stderr)
        return 1 if report.skipped else 0
    kept = save_keeping_previous(model, output)
    why = {"radius": f"every new patch is within the coverage radius {report.radius:.4g}",
           "budget": f"the budget --max-new {args.max_new} was reached (farthest new patch still "
                     f"{report.covering_radius:.4g} from the bank, radius {report.radius:.4g})",
           "exhausted": "every new patch was added"}[report.stopped_by]
    print(f"wrote {output}: bank {before} -> {report.bank_after} rows from {report.n_patches} patches of "
          f"{report.n_images} images in {report.seconds:.1f} s; stopped because {why}", file=sys.stderr)
    if kept is not None:
        print(f"previous version kept as {kept} (roll back: mv {shlex.quote(str(kept))} "
              f"{shlex.quote(str(real_model_path(output)))})", file=sys.stderr)
    print("thresholds kept as calibrated at fit (added good images only lower scores)", file=sys.stderr)
    return 1 if report.skipped else 0






def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server.api import create_app
        from .server.registry import ModelRegistry
        from .server.settings import ServerSettings, is_loopback, read_token
    except ImportError as err:
        raise InputError(f"the server needs the 'serve' extra: pip install 'patchcore[serve]' ({err})") from None
    ModelRegistry(args.models).check_folder()  # a mistyped folder is an error, not an empty server
    token = read_token(args.token_file)
    if not is_loopback(args.host) and token is None and not args.open_predict:
        raise InputError(f"--host {args.host} is reachable from other machines: give a token (--token-file or "
                         f"PATCHCORE_TOKEN), or --open-predict to serve predictions without one")
    models = Path(args.models)
    settings = ServerSettings(
        models_dir=models, review_dir=Path(args.review_dir) if args.review_dir else models / "review",
        host=args.host, token=token, open_predict=args.open_predict, device=args.device, runtime=args.runtime,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
        max_input_pixels=args.max_input_pixels)
    print(f"serving {models}/*.model on http://{args.host}:{args.port}/ (page /page/, API docs /docs); "
          f"state-changing endpoints {'need the token' if token else 'are disabled (no token)'}", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def add_parsers(sub, common) -> None:
    update = sub.add_parser("update", help="add defect-free images to a fitted model without refitting",
                            description="Continue the model's greedy k-center coreset over the new images' "
                                        "patches; the previous model file is kept as MODEL.<time>.prev.")
    update.add_argument("model", help="model file from `patchcore fit`")
    update.add_argument("images", nargs="+", help="folders or files of new good images")
    update.add_argument("-o", "--output", required=True, help="model file to write (may be MODEL itself)")
    update.add_argument("--max-new", type=non_negative_int, default=None,
                        help="budget: add at most this many bank rows (default: until every new patch is covered)")
    update.add_argument("--radius", type=positive_finite_float, default=None,
                        help="coverage radius to reach (default: the model's distance scale, an estimate of "
                             "its coverage radius)")
    update.add_argument("--weights", default=None, help="local backbone weights file, if the model's is elsewhere")
    common(update)
    update.set_defaults(run=cmd_update)

    serve = sub.add_parser("serve", help="HTTP API and inspection page for every *.model in a folder")
    serve.add_argument("models", help="folder of *.model files (served by file stem)")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                       help="onnx: score each MODEL through its export MODEL.onnx/ (patchcore export), no torch "
                            "in the scoring path; updates still use the library")
    serve.add_argument("--token-file", default=None,
                       help="file holding the bearer token for feedback/update/reload (else $PATCHCORE_TOKEN)")
    serve.add_argument("--open-predict", action="store_true",
                       help="with a non-loopback --host, let predict through without the token")
    serve.add_argument("--review-dir", default=None, help="review store folder (default: MODELS/review)")
    serve.add_argument("--max-batch", type=positive_int, default=8, help="images per predict_batch call (default 8)")
    serve.add_argument("--max-wait-ms", type=non_negative_float, default=10.0,
                       help="how long a batch waits to fill (default 10 ms)")
    serve.add_argument("--max-queue", type=positive_int, default=32,
                       help="predict requests in flight before 503 (default 32)")
    serve.add_argument("--max-upload-mb", type=positive_finite_float, default=20.0,
                       help="largest upload (default 20 MiB)")
    serve.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                       help="largest image, from its header, before decoding (default 40 Mpixel)")
    serve.add_argument("--max-input-pixels", type=positive_int, default=4_000_000,
                       help="largest model input of one upload, after the model's resize and crop: bounds the "
                            "memory of one request (default 4 Mpixel; ~250 B per pixel with EfficientNet-Lite0)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    common(serve)
    serve.set_defaults(run=cmd_serve)
