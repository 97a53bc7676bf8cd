"""`patchcore bench`: where fit and predict time goes, and how much memory a fit takes.

Reports, as JSON and a short table: fit seconds split into feature extraction and coreset; predict
milliseconds per image from files (decoding included, as the peers measure it); latency at batch 1
and throughput at a larger batch from decoded uint8 tensors; peak RSS of the process after fit and
at the end; and, on an MVTec-layout category, image and pixel AUROC.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _split(data: Path) -> tuple[list[Path], list[Path]]:
    from .images import list_images

    if (data / "train" / "good").is_dir():
        train = list_images(data / "train" / "good")
        tests = list_images(data / "test", recursive=True) if (data / "test").is_dir() else train[:32]
        return train, tests
    images = list_images(data)
    return images, images[:32]


def run_bench(data: Path, config, *, device: str = "auto", throughput_batch: int = 32, latency_images: int = 20,
              repeats: int = 1, quiet: bool = False) -> dict:
    from . import __version__
    from .images import as_uint8_tensor, read_image
    from .model import PatchCore

    train, tests = _split(data)
    fits = []
    for _ in range(repeats):
        model = PatchCore(config, device=device)
        _ = model.backbone  # weights load is not fit time
        started = time.perf_counter()
        model.fit(train)
        _sync(model.device)
        report = model.fit_report_
        fits.append({"fit_s": time.perf_counter() - started, "embed_s": report.embed_seconds,
                     "coreset_s": report.coreset_seconds, "calibration_s": report.calibration_seconds})
    peak_after_fit = peak_rss_mib()
    result = {"fit_s": statistics.median(f["fit_s"] for f in fits),
              "fit_embed_s": statistics.median(f["embed_s"] for f in fits),
              "fit_coreset_s": statistics.median(f["coreset_s"] for f in fits),
              "fit_runs": fits, "peak_rss_after_fit_mib": peak_after_fit,
              "bank_shape": list(model.memory_bank_.shape), "n_train_images": len(train)}

    # Predict from files: decode + preprocess + score, as the peers' predict timings include loading.
    started = time.perf_counter()
    scored = model.predict(tests)
    _sync(model.device)
    result["predict_ms_per_image_from_files"] = 1000 * (time.perf_counter() - started) / len(tests)
    result["n_test_images"] = len(tests)

    # From decoded tensors (the serving path): latency at batch 1, throughput at a larger batch.
    decoded = [as_uint8_tensor(read_image(p)) for p in tests[:max(latency_images, 1)]]
    same = [d for d in decoded if d.shape == decoded[0].shape]
    latencies = []
    for image in same:
        x = image[None].to(model.device)
        _sync(model.device)
        started = time.perf_counter()
        model.predict(x)
        _sync(model.device)
        latencies.append(1000 * (time.perf_counter() - started))
    result["latency_ms_batch1_median"] = statistics.median(latencies[1:] or latencies)
    batch = torch.stack([same[i % len(same)] for i in range(throughput_batch)]).to(model.device)
    runs = []
    for _ in range(3):
        _sync(model.device)
        started = time.perf_counter()
        _score_in_one_batch(model, batch)
        _sync(model.device)
        runs.append(time.perf_counter() - started)
    result["throughput_batch"] = throughput_batch
    result["throughput_images_per_s"] = throughput_batch / statistics.median(runs)
    result["peak_rss_mib"] = peak_rss_mib()

    accuracy = _accuracy(data, model, tests, scored)
    if accuracy:
        result.update(accuracy)
    result["settings"] = {"data": str(data), "device": str(model.device), "config": config.to_dict(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "python": platform.python_version(), "patchcore": __version__,
                          "cpu": platform.processor() or platform.machine()}
    return result


def _score_in_one_batch(model, batch: torch.Tensor):
    return model._score_uint8(batch)


def _accuracy(data: Path, model, tests: list[Path], scored) -> dict | None:
    """Image and pixel AUROC when `data` is an MVTec-layout category with ground truth."""
    try:
        from .datasets import load_split
        from .evaluate import masks_at_model_geometry
        from .metrics import auroc
    except ImportError:
        return None
    if not (data / "ground_truth").is_dir():
        return None
    split = load_split(data)
    by_path = {Path(p).resolve(): i for i, p in enumerate(tests)}
    order = [by_path[Path(item.path).resolve()] for item in split.test]
    labels = [item.label for item in split.test]
    scores = scored.scores[order].numpy()
    maps = scored.maps[order].numpy()
    masks = masks_at_model_geometry(split.test, model)
    return {"image_auroc": auroc(labels, scores), "pixel_auroc": auroc(masks.reshape(-1), maps.reshape(-1))}


def format_table(result: dict) -> str:
    rows = [
        ("fit s (embed + coreset)", f"{result['fit_s']:.1f} ({result['fit_embed_s']:.1f} + {result['fit_coreset_s']:.1f})"),
        ("predict ms/img from files", f"{result['predict_ms_per_image_from_files']:.1f}"),
        ("latency ms, batch 1", f"{result['latency_ms_batch1_median']:.1f}"),
        (f"throughput img/s, batch {result['throughput_batch']}", f"{result['throughput_images_per_s']:.1f}"),
        ("peak RSS MiB after fit / end", f"{result['peak_rss_after_fit_mib']:.0f} / {result['peak_rss_mib']:.0f}"),
    ]
    if "image_auroc" in result:
        rows.append(("image / pixel AUROC", f"{result['image_auroc']:.4f} / {result['pixel_auroc']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_parser(sub, common) -> None:
    from .cli import add_config_options

    parser = sub.add_parser("bench", help="time fit and predict, measure peak memory (and AUROC on MVTec data)")
    parser.add_argument("data", help="an MVTec-layout category (train/good, test/) or a folder of images")
    parser.add_argument("-o", "--output", default=None, help="write the results as JSON here")
    parser.add_argument("--throughput-batch", type=int, default=32, help="batch for the throughput run (default 32)")
    parser.add_argument("--repeats", type=int, default=1, help="fit this many times and report the median")
    common(parser)
    add_config_options(parser)
    parser.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    from .cli import config_from_args

    result = run_bench(Path(args.data), config_from_args(args), device=args.device,
                       throughput_batch=args.throughput_batch, repeats=args.repeats, quiet=args.quiet)
    print(format_table(result), file=sys.stderr)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0
