"""`patchcore bench`: where fit and predict time goes, and how much memory a fit takes.

Reports, as JSON and a short table: fit seconds split into feature extraction and coreset; predict
milliseconds per image from files (decoding included, as the peers measure it); latency at batch 1
and throughput at a larger batch from decoded uint8 tensors; peak RSS of the process after fit and
at the end; and, on an MVTec-layout category, image and pixel AUROC.
"""
from __future__ import annotations

import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from ..config import PatchCoreConfig
from ..estimator import PatchCore
from ..io.images import as_uint8_tensor, read_image
from .datasets import load_split
from .evaluate import evaluate_category, peak_rss_mib
from .progress import Progress, no_progress


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(data: Path, config: PatchCoreConfig, *, device: str = "auto", throughput_batch: int = 32,
              latency_images: int = 20, progress: Progress = no_progress) -> dict:
    """Fit and score `data` (an MVTec-layout category) through `evaluate`, then time the tensor path."""
    split = load_split(data)
    model = PatchCore(config, device=device)
    record = evaluate_category(split, config, progress=progress, model=model)
    timings = record["timings"]
    result = {
        "fit_s": timings["fit_seconds"], "fit_embed_s": timings["embed_seconds"],
        "fit_coreset_s": timings["coreset_seconds"], "fit_calibration_s": timings["calibration_seconds"],
        "peak_rss_after_fit_mib": timings["peak_rss_after_fit_mib"],
        "predict_ms_per_image_from_files": timings["predict_ms_per_image"],
        "bank_shape": list(model.memory_bank_.shape), "n_train_images": len(split.train),
        "n_patches": record["fit"]["n_patches"],
        # The coreset's cost per million training patches at this ratio: how fit time scales (README).
        "coreset_s_per_million_patches": 1e6 * timings["coreset_seconds"] / max(1, record["fit"]["n_patches"]),
        "n_test_images": len(split.items),
        "image_auroc": record["metrics"]["image_auroc"], "pixel_auroc": record["metrics"]["pixel_auroc"],
        "aupro": record["metrics"]["aupro"],
    }

    # From decoded tensors (the serving path): latency at batch 1, throughput at a larger batch.
    decoded = [as_uint8_tensor(read_image(item.path)) for item in split.items[:max(latency_images, 2)]]
    # Images of any sizes one at a time for latency; the throughput batch needs one size: the commonest.
    commonest = Counter(d.shape for d in decoded).most_common(1)[0][0]
    same = [d for d in decoded if d.shape == commonest]
    latencies = []
    for image in decoded:
        x = image[None].to(model.device)
        _sync(model.device)
        started = time.perf_counter()
        model.predict(x)
        _sync(model.device)
        latencies.append(1000 * (time.perf_counter() - started))
    result["latency_ms_batch1_median"] = statistics.median(latencies[1:])  # the first call warms up
    batch = torch.stack([same[i % len(same)] for i in range(throughput_batch)]).to(model.device)
    runs = []
    for _ in range(3):
        _sync(model.device)
        started = time.perf_counter()
        model.predict_batch(batch)
        _sync(model.device)
        runs.append(time.perf_counter() - started)
    result["throughput_batch"] = throughput_batch
    result["throughput_images_per_s"] = throughput_batch / statistics.median(runs)
    result["peak_rss_mib"] = peak_rss_mib()
    result["settings"] = {"data": str(data), "device": record["device"], "config": model.config.to_dict(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "python": platform.python_version(), "patchcore": record["package_version"],
                          "machine": platform.machine(), "pixel_resolution": record["pixel_resolution"]}
    return result


def format_table(result: dict) -> str:
    rows = [
        ("fit s (embed + coreset)",
         f"{result['fit_s']:.1f} ({result['fit_embed_s']:.1f} + {result['fit_coreset_s']:.1f})"),
        ("coreset s per 1M patches", f"{result['coreset_s_per_million_patches']:.1f} "
                                     f"({result['n_patches']} patches -> {result['bank_shape'][0]})"),
        ("predict ms/img from files", f"{result['predict_ms_per_image_from_files']:.1f}"),
        ("latency ms, batch 1", f"{result['latency_ms_batch1_median']:.1f}"),
        (f"throughput img/s, batch {result['throughput_batch']}", f"{result['throughput_images_per_s']:.1f}"),
        ("peak RSS MiB after fit / end", f"{result['peak_rss_after_fit_mib']:.0f} / {result['peak_rss_mib']:.0f}"),
    ]
    pixel = "-" if result["pixel_auroc"] is None else f"{result['pixel_auroc']:.4f}"
    rows.append(("image / pixel AUROC", f"{result['image_auroc']:.4f} / {pixel}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
