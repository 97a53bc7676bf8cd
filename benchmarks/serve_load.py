"""Load test of `patchcore serve` on loopback: throughput and latency against offline predict_batch, then
overload (503s instead of growing memory) and recovery. Bounded in time and in requests.

    .venv/bin/python benchmarks/serve_load.py --model bottle.model --images ../shared/data/mvtec_ad/bottle/test \
        [--clients 8 --seconds 60 --overload-clients 64 --overload-seconds 20] [-o results/serve_load.json]

Without --model it fits EfficientNet-Lite0 (default settings) on --train first. The server runs as a
subprocess (its RSS is read from /proc); the clients are threads here. The CPU may be shared: the load
average is recorded, and the server-vs-offline ratio is what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.io.images import as_uint8_tensor, expand_inputs, list_images, read_image


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(model: PatchCore, images: list[torch.Tensor], batch: int, seconds: float) -> dict:
    """predict_batch on decoded images, stacks of `batch`, for about `seconds` (at least one pass)."""
    model.predict_batch(torch.stack(images[:batch]))  # warm-up
    done, started = 0, time.perf_counter()
    while True:
        for i in range(0, len(images), batch):
            stack = torch.stack(images[i:i + batch])
            model.predict_batch(stack)
            done += stack.shape[0]
        if time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def offline_from_files(model: PatchCore, paths: list[Path], seconds: float) -> dict:
    """The library's own path from image files (decoding in background threads, as the server decodes its
    uploads, then predict_batch per batch): the like-for-like baseline for the server's throughput."""
    done, started = 0, time.perf_counter()
    while True:
        for batch in model.iter_predict(paths):
            done += len(batch.paths)
        if time.perf_counter() - started >= seconds:
            break
    elapsed = time.perf_counter() - started
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def load(url: str, payloads: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    latencies, codes, sent = [], {}, [0]

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            i = k
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                data = payloads[i % len(payloads)]
                i += clients
                started = time.perf_counter()
                try:
                    reply = http.post("/v1/models/bench/predict", files={"file": ("x.png", data, "image/png")})
                    code = reply.status_code
                except httpx.HTTPError as err:
                    code = type(err).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        latencies.append(elapsed)
                if code == 503:
                    time.sleep(0.05)  # a polite client backs off (Retry-After says 1 s; we probe faster)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"clients": clients, "seconds": elapsed, "codes": {str(k): v for k, v in codes.items()},
            "ok": len(latencies), "images_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model file (default: fit one on --train)")
    parser.add_argument("--train", default="../shared/data/mvtec_ad/bottle/train/good")
    parser.add_argument("--subset", type=int, default=None, help="fit on the first N training images only")
    parser.add_argument("--images", default="../shared/data/mvtec_ad/bottle/test", help="request payloads")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=20000, help="cap per phase")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="the server's batching window")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    models = work / "models"
    models.mkdir()
    if args.model:
        os.link(args.model, models / "bench.model") if Path(args.model).stat().st_dev == models.stat().st_dev \
            else (models / "bench.model").write_bytes(Path(args.model).read_bytes())
    else:
        train = list_images(args.train)[:args.subset]
        print(f"fitting efficientnet_lite0 on {len(train)} images", file=sys.stderr)
        PatchCore(PatchCoreConfig(backbone="efficientnet_lite0"), device="cpu").fit(train).save(models / "bench.model")
    paths = sorted(p for p in expand_inputs([Path(args.images) / d for d in sorted(os.listdir(args.images))]))
    payloads = [p.read_bytes() for p in paths]
    result = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "payload_images": len(paths)}

    model = PatchCore.load(models / "bench.model", device="cpu")
    decoded = [as_uint8_tensor(read_image(p)) for p in paths]
    result["offline_predict_batch"] = offline(model, decoded, args.max_batch, min(args.seconds, 30.0))
    result["offline_from_files"] = offline_from_files(model, paths, min(args.seconds, 30.0))
    del model, decoded
    print("offline", result["offline_predict_batch"], result["offline_from_files"], file=sys.stderr)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "patchcore.app.cli", "serve", str(models), "--port", str(port),
                               "--device", "cpu", "--max-batch", str(args.max_batch), "--max-queue",
                               str(args.max_queue), "--max-wait-ms", str(args.max_wait_ms)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        load(url, payloads[:8], 2, 3.0, 50)  # warm-up
        result["rss_mib_start"] = rss_mib(server.pid)
        result["steady"] = load(url, payloads, args.clients, args.seconds, args.max_requests)
        result["rss_mib_after_steady"] = rss_mib(server.pid)
        print("steady", result["steady"], file=sys.stderr)

        peak, stop = [0.0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(server.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        result["overload"] = load(url, payloads, args.overload_clients, args.overload_seconds, args.max_requests)
        stop.set()
        sampler.join()
        result["rss_mib_peak_overload"] = peak[0]
        print("overload", result["overload"], file=sys.stderr)
        result["recovery"] = load(url, payloads, args.clients, 10.0, args.max_requests)
        result["rss_mib_end"] = rss_mib(server.pid)
        print("recovery", result["recovery"], file=sys.stderr)
        result["metrics_excerpt"] = [line for line in httpx.get(url + "/metrics").text.splitlines()
                                     if line.startswith(("patchcore_rejected_total", "patchcore_batch_size_sum",
                                                         "patchcore_batch_size_count", "patchcore_model_version"))]
    finally:
        server.terminate()
        server.wait(timeout=30)
    result["load_average_after"] = os.getloadavg()
    steady, off = result["steady"]["images_per_s"], result["offline_predict_batch"]["images_per_s"]
    result["server_over_offline"] = steady / off  # decoded tensors: no decoding in the baseline
    result["server_over_offline_from_files"] = steady / result["offline_from_files"]["images_per_s"]
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
