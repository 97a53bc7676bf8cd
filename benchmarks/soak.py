"""Soak test of `patchcore serve` on loopback: mixed traffic for a bounded time and number of requests,
with the server's RSS sampled every minute (issue 16, point 6).

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--max-requests 200000] [--clients 4] -o soak.json

Traffic, from `--clients` threads in this process against a `patchcore serve` subprocess (127.0.0.1 only):
predictions (good parts and a colour variant the model has not seen, some with ?overlay=1&heatmap=1&map=1),
hostile uploads (cut-short PNG, text, zero bytes, a 30000 x 30000 header, a wrong content type, an upload
over the size limit), feedback (good on variant parts, defect on some), listing and withdrawing feedback,
/metrics, and from a separate thread an apply-update (at most --max-new rows) every --update-every
seconds and a reload every --reload-every seconds. Every answer must be one of the expected statuses;
anything else (a 500, a dropped connection) is counted and listed.

RSS is read from /proc/<pid>/status (VmRSS) at the start, after a one-minute warm-up and then every
minute. The growth is reported from the warm-up sample to the last one, with the bank rows at each sample
(each applied update legitimately adds rows: --max-new rows x D x 4 bytes at most).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TOKEN = "soak-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def payloads(size: int, seed: int) -> dict[str, list[bytes]]:
    from patchcore.evaluation.synthetic import fabric_texture, paste_defect

    rng = np.random.default_rng(seed)
    good = [fabric_texture(rng, size) for _ in range(8)]
    variant = [np.ascontiguousarray(fabric_texture(rng, size)[..., [2, 0, 1]]) for _ in range(8)]
    defects = [paste_defect(fabric_texture(rng, size), rng, kind)[0] for kind in ("scratch", "stain", "hole")]
    cut = png(good[0])[:200]
    big_header = bytearray(png(np.zeros((8, 8, 3), np.uint8)))
    big_header[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height (CRC now wrong: 422 or 413)
    return {"good": [png(a) for a in good], "variant": [png(a) for a in variant], "defect": [png(a) for a in defects],
            "hostile": [cut, b"this is not an image", b"", bytes(big_header)]}


def fit_model(folder: Path, size: int, backbone: str) -> Path:
    from patchcore import PatchCore, PatchCoreConfig
    from patchcore.evaluation.synthetic import fabric_texture

    rng = np.random.default_rng(0)
    train = [fabric_texture(rng, size) for _ in range(20)]
    config = PatchCoreConfig(backbone=backbone, resize=size, crop=None, coreset_ratio=0.1, batch_size=4)
    path = folder / "fabric.model"
    PatchCore(config, device="cpu").fit(train).save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side of the synthetic parts")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--update-every", type=float, default=120.0, help="seconds between apply-updates")
    parser.add_argument("--reload-every", type=float, default=180.0, help="seconds between reloads")
    parser.add_argument("--max-new", type=int, default=20, help="bank rows one apply-update may add")
    parser.add_argument("--sample-every", type=float, default=60.0, help="seconds between RSS samples")
    parser.add_argument("-o", "--output", default="soak.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="patchcore-soak-"))
    models = work / "models"
    models.mkdir()
    started_fit = time.perf_counter()
    fit_model(models, args.size, args.backbone)
    print(f"fitted in {time.perf_counter() - started_fit:.1f} s; serving from {models}", file=sys.stderr)
    (work / "token.txt").write_text(TOKEN + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "patchcore.app.cli", "serve", str(models), "--host", "127.0.0.1", "--port", str(port),
         "--token-file", str(work / "token.txt"), "--device", "cpu", "--max-upload-mb", "2", "--max-queue", "16",
         "--max-wait-ms", "20"], env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit("the server did not become ready")
        time.sleep(0.2)

    data = payloads(args.size, seed=1)
    stop = threading.Event()
    lock = threading.Lock()
    counts: Counter = Counter()
    unexpected: list[str] = []
    sent = [0]
    variant_results: list[str] = []
    feedback_ids: list[int] = []
    events: list[dict] = []
    # every answer must be one of these; anything else is a finding
    allowed = {"predict": {200, 503}, "hostile": {413, 415, 422, 503}, "feedback": {201, 404}, "list": {200},
               "withdraw": {200, 404, 409}, "metrics": {200}, "apply-update": {200, 409, 422}, "reload": {200},
               "too_large": {413}, "wrong_type": {415}}

    def record(kind: str, response: httpx.Response | None, error: str | None = None) -> None:
        with lock:
            status = response.status_code if response is not None else "error"
            counts[f"{kind} {status}"] += 1
            if response is None or response.status_code not in allowed[kind]:
                detail = error or (response.text[:200] if response is not None else "")
                if len(unexpected) < 50:
                    unexpected.append(f"{kind} -> {status}: {detail}")

    def budget() -> bool:
        with lock:
            sent[0] += 1
            return sent[0] <= args.max_requests and not stop.is_set()

    def call(kind: str, method: str, http: httpx.Client, path: str, **kw) -> httpx.Response | None:
        try:
            response = http.request(method, path, **kw)
        except httpx.HTTPError as err:
            record(kind, None, f"{type(err).__name__}: {err}")
            return None
        record(kind, response)
        return response

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=url, timeout=120) as http:
            while budget():
                roll = rng.random()
                if roll < 0.55:
                    group = rng.choice(["good", "good", "variant", "defect"])
                    query = "?overlay=1&heatmap=1&map=1" if rng.random() < 0.1 else ""
                    r = call("predict", "POST", http, f"/v1/models/fabric/predict{query}",
                             files={"file": ("part.png", rng.choice(data[group]), "image/png")})
                    if r is not None and r.status_code == 200 and group == "variant":
                        with lock:
                            variant_results.append(r.json()["result_id"])
                            del variant_results[:-64]
                elif roll < 0.70:
                    call("hostile", "POST", http, "/v1/models/fabric/predict",
                         files={"file": ("x.png", rng.choice(data["hostile"]), "image/png")})
                elif roll < 0.72:
                    call("wrong_type", "POST", http, "/v1/models/fabric/predict",
                         files={"file": ("x.txt", b"hello", "text/plain")})
                elif roll < 0.73:
                    call("too_large", "POST", http, "/v1/models/fabric/predict",
                         files={"file": ("x.png", os.urandom(3 << 20), "image/png")})
                elif roll < 0.83:
                    with lock:
                        result_id = rng.choice(variant_results) if variant_results else "0" * 32
                    verdict = "good" if rng.random() < 0.8 else "defect"
                    r = call("feedback", "POST", http, "/v1/models/fabric/feedback", headers=AUTH,
                             json={"result_id": result_id, "verdict": verdict})
                    if r is not None and r.status_code == 201:
                        with lock:
                            feedback_ids.append(r.json()["feedback_id"])
                elif roll < 0.88:
                    call("list", "GET", http, "/v1/models/fabric/feedback?limit=200")
                elif roll < 0.91:
                    with lock:
                        target = feedback_ids.pop(rng.randrange(len(feedback_ids))) if feedback_ids else 10**9
                    call("withdraw", "DELETE", http, f"/v1/models/fabric/feedback/{target}", headers=AUTH)
                else:
                    call("metrics", "GET", http, "/metrics")

    def maintainer() -> None:
        last_update = last_reload = time.monotonic()
        with httpx.Client(base_url=url, timeout=600) as http:
            while not stop.wait(1.0):
                now = time.monotonic()
                if now - last_update >= args.update_every:
                    last_update = now
                    r = call("apply-update", "POST", http, "/v1/models/fabric/apply-update", headers=AUTH,
                             json={"max_new": args.max_new})
                    if r is not None:
                        body = r.json()
                        events.append({"t": round(now - t0, 1), "event": "apply-update", "status": r.status_code,
                                       "bank_after": body.get("bank_rows_after"),
                                       "left_out": len(body.get("left_out", [])) if isinstance(body, dict) else None})
                if now - last_reload >= args.reload_every:
                    last_reload = now
                    r = call("reload", "POST", http, "/v1/models/fabric/reload", headers=AUTH)
                    if r is not None:
                        events.append({"t": round(now - t0, 1), "event": "reload", "status": r.status_code})

    def bank_rows() -> int | None:
        try:
            return httpx.get(url + "/v1/models/fabric", timeout=30).json()["bank_rows"]
        except (httpx.HTTPError, KeyError, ValueError):
            return None

    t0 = time.monotonic()
    samples = [{"t_s": 0.0, "rss_mib": rss_mib(server.pid), "bank_rows": bank_rows(), "requests": 0}]
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    threads.append(threading.Thread(target=maintainer, daemon=True))
    for thread in threads:
        thread.start()
    end = t0 + args.minutes * 60
    next_sample = t0 + args.sample_every
    try:
        while time.monotonic() < end and sent[0] < args.max_requests and server.poll() is None:
            time.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
            if time.monotonic() >= next_sample:
                next_sample += args.sample_every
                sample = {"t_s": round(time.monotonic() - t0, 1), "rss_mib": rss_mib(server.pid),
                          "bank_rows": bank_rows(), "requests": sent[0]}
                samples.append(sample)
                print(f"{sample['t_s']:7.0f} s  RSS {sample['rss_mib']:7.1f} MiB  bank {sample['bank_rows']}  "
                      f"requests {sample['requests']}", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        died = server.poll()
        final_rss = rss_mib(server.pid) if died is None else float("nan")
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    warm = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    result = {
        "minutes": round((time.monotonic() - t0) / 60, 2), "requests": sent[0], "clients": args.clients,
        "server_died": died is not None, "server_exit_on_sigterm": server.returncode,
        "counts": dict(sorted(counts.items())), "unexpected": unexpected, "events": events, "samples": samples,
        "rss_warm_mib": warm["rss_mib"], "rss_last_mib": last["rss_mib"], "rss_final_mib": final_rss,
        "rss_growth_pct_after_warmup": round(100 * (last["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"], 2),
        "bank_rows_warm": warm["bank_rows"], "bank_rows_last": last["bank_rows"],
        "load_average": os.getloadavg(),
    }
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "events")}, indent=1), file=sys.stderr)
    return 0 if not unexpected and died is None else 1


if __name__ == "__main__":
    sys.exit(main())
