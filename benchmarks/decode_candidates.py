#!/usr/bin/env python3
"""Decoders that install from PyPI, on PNG and JPEG of 0.25-20 Mpx, and on the hostile corpus (issue 17.6).

Run it in an environment that has the candidates (OpenCV is not a patchcore dependency):

    python3 -m venv /tmp/dec && /tmp/dec/bin/pip install numpy pillow pyspng simplejpeg zlib-ng opencv-python-headless
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src /tmp/dec/bin/python benchmarks/decode_candidates.py \
        --fuzz 2000 -o decode.json

Speed: median of --repeats decodes per file, one thread (OpenCV's own threads set to 1), the file already
in memory (the read is the same for all), the candidates interleaved in each repeat (so that load from other
jobs falls on all alike). Candidates: Pillow (open + load, as io/images.py did for every file), pyspng.load
(libspng, PNG only), libspng through ctypes on the file as it is (io/fast_decode.py before zlib-ng), zlib-ng + libspng
(io/fast_decode.py now), simplejpeg (libjpeg-turbo, JPEG only),
OpenCV imdecode (libpng / libjpeg-turbo); and read_image from a file with and without io/fast_decode.py.
With --png-cpu FOLDER...: only read_image's CPU time on PNGs (the generated sizes and every PNG under each
FOLDER), Pillow only / libspng on the file as it is / zlib-ng + libspng, and two decoding threads' wall time:

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src .venv/bin/python benchmarks/decode_candidates.py --repeats 7 \
        --png-cpu ../shared/data/mvtec_ad/bottle/test ../shared/data/mvtec_ad_reduced/hazelnut -o png_cpu.json

GIL: the median wake-up delay of a 1 ms sleep in another thread while a candidate decodes in a loop (a
decoder that holds the GIL delays it by a whole decode, and so stalls the model's thread beside it).
Safety: every hostile file of tests/hostile.py and --fuzz mutated seeds, each candidate in a child process
per batch of files: "crash" is a child killed by a signal (a segfault kills a scoring process), "silent"
a short-data PNG decoded without an error (black rows instead of a refusal). Agreement: read_image with and
without io/fast_decode.py on the same fuzz cases (verdicts and pixels).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hostile  # the project's hostile corpus and mutator

from patchcore.errors import ImageReadError
from patchcore.io import fast_decode, images


def decoders() -> dict:
    def pillow(data):
        image = Image.open(io.BytesIO(data))
        image.load()
        return np.asarray(image)

    found = {"pillow": pillow}
    try:
        import pyspng
        found["pyspng"] = lambda data: pyspng.load(data)
    except ImportError:
        pass
    if fast_decode._libspng() is not None:
        def spng_ctypes(data):  # the file as it is: libspng's own zlib inflates
            image = Image.open(io.BytesIO(data))
            return fast_decode._spng_decode(data, image.height, image.width, inflated=False)
        found["libspng-ctypes"] = spng_ctypes
        if fast_decode._decompressobj() is not None:
            def zlib_ng_spng(data):  # io/fast_decode.py now: zlib-ng inflates, libspng unfilters stored blocks
                image = Image.open(io.BytesIO(data))
                return fast_decode._decode_png(data, image.height, image.width)
            found["zlib-ng+libspng"] = zlib_ng_spng
    try:
        import simplejpeg
        found["simplejpeg"] = lambda data: simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ImportError:
        pass
    try:
        import cv2
        cv2.setNumThreads(1)

        def opencv(data):
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError("cv2.imdecode returned None")
            return image[..., ::-1]
        found["opencv"] = opencv
    except ImportError:
        pass
    return found


FORMATS = {"pyspng": ("PNG",), "libspng-ctypes": ("PNG",), "zlib-ng+libspng": ("PNG",),
           "simplejpeg": ("JPEG",)}  # the others decode both


def test_images(source: Path) -> dict[str, bytes]:
    """PNG and JPEG (quality 95) of a real MVTec photograph scaled to 0.25, 1, 5 and 20 Mpx (and the original)."""
    base = Image.open(source).convert("RGB")
    out = {}
    for mpx in (0.25, 0.81, 5.0, 20.0):
        side = int((mpx * 1e6) ** 0.5)
        picture = base.resize((side, side), Image.Resampling.BICUBIC)
        for fmt, kwargs in (("PNG", {}), ("JPEG", {"quality": 95})):
            buffer = io.BytesIO()
            picture.save(buffer, fmt, **kwargs)
            out[f"{fmt} {side}x{side} ({side * side / 1e6:.2f} Mpx)"] = buffer.getvalue()
    return out


def speed(found: dict, files: dict[str, bytes], repeats: int) -> dict:
    """Median ms per decode, the candidates interleaved; plus read_image from a file, fast decoders on/off."""
    installed = fast_decode.decoders
    table = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, data in files.items():
            fmt = label.split()[0]
            path = Path(folder) / ("file.png" if fmt == "PNG" else "file.jpg")
            path.write_bytes(data)
            runs = {name: decode for name, decode in found.items() if fmt in FORMATS.get(name, ("PNG", "JPEG"))}
            runs["read_image pillow only"] = lambda _, path=path: read_with(dict, path)
            runs["read_image fast"] = lambda _, path=path: read_with(installed, path)
            times = {name: [] for name in runs}
            for decode in runs.values():
                decode(data)
            for _ in range(repeats):
                for name, decode in runs.items():
                    started = time.perf_counter()
                    decode(data)
                    times[name].append(1000 * (time.perf_counter() - started))
            table[label] = {name: round(statistics.median(t), 2) for name, t in times.items()}
            print(label, table[label], file=sys.stderr, flush=True)
    fast_decode.decoders = installed
    return table


def read_with(decoders, path: Path) -> np.ndarray:
    fast_decode.decoders = decoders
    return images.read_image(path)


def png_cpu(sets: dict[str, list[Path]], repeats: int) -> dict:
    """read_image's CPU ms per file (time.process_time; one thread), median of `repeats` passes over each set,
    the variants interleaved in every pass: Pillow only; libspng on the file as it is (before zlib-ng); zlib-ng
    + libspng (io/fast_decode.py now). Plus the wall time of two threads each decoding the set over one
    thread's (about 1 on two free cores where decoding runs without the GIL, 2 where it is serialised; also 2
    on a machine whose other jobs leave less than two cores), and the GIL wait of another thread (`gil_wait`)
    while read_image decodes the set in a loop, before and now."""
    installed, inflater = fast_decode.decoders, fast_decode._decompressobj
    variants = {"pillow only": (dict, inflater), "libspng as is (before)": (installed, lambda: None),
                "zlib-ng + libspng (now)": (installed, inflater)}

    def run(variant: str, files: list[Path]) -> None:
        fast_decode.decoders, fast_decode._decompressobj = variants[variant]
        for path in files:
            images.read_image(path)

    table = {}
    for label, files in sets.items():
        times = {name: [] for name in variants}
        for name in variants:
            run(name, files[:1])
        for _ in range(repeats):
            for name in variants:
                started = time.process_time()
                run(name, files)
                times[name].append(1000 * (time.process_time() - started) / len(files))
        row = {name: round(statistics.median(t), 2) for name, t in times.items()}
        row["now/before"] = round(row["zlib-ng + libspng (now)"] / row["libspng as is (before)"], 3)
        walls = {1: [], 2: []}
        for _ in range(repeats):
            for count in (1, 2):
                workers = [threading.Thread(target=run, args=("zlib-ng + libspng (now)", files))
                           for _ in range(count)]
                started = time.perf_counter()
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
                walls[count].append(time.perf_counter() - started)
        row["2 threads/1 thread wall"] = round(statistics.median(walls[2]) / statistics.median(walls[1]), 2)
        for name in ("libspng as is (before)", "zlib-ng + libspng (now)"):
            row[f"GIL wait ms, {name}"] = gil_wait(lambda name=name, files=files: run(name, files))
        table[f"{label} ({len(files)} files)"] = row
        print(label, row, file=sys.stderr, flush=True)
    fast_decode.decoders, fast_decode._decompressobj = installed, inflater
    return table


def gil_wait(work, seconds: float = 1.0) -> list[float]:
    """Median, 90th percentile and largest wake-up delay (ms) of a 1 ms sleep while another thread calls `work`
    in a loop (the largest shows a long hold that is a small part of each call, e.g. a big copy under the GIL)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()
    worker = threading.Thread(target=loop)
    worker.start()
    waits, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        time.sleep(0.001)
        waits.append(1000 * (time.perf_counter() - started) - 1)
    stop.set()
    worker.join()
    waits.sort()
    return [round(waits[len(waits) // 2], 2), round(waits[9 * len(waits) // 10], 2), round(waits[-1], 2)]


def spin(decode, data: bytes, stop: threading.Event) -> None:
    while not stop.is_set():
        decode(data)


def gil(found: dict, files: dict[str, bytes]) -> dict:
    """Median and 90th percentile wake-up delay (ms) of a 1 ms sleep while another thread decodes."""
    def delays(seconds: float) -> list[float]:
        out, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            time.sleep(0.001)
            out.append(1000 * (time.perf_counter() - started) - 1)
        return sorted(out)

    png = next(data for label, data in files.items() if label.startswith("PNG original"))
    jpeg = next(data for label, data in files.items() if label.startswith("JPEG"))
    result = {"no decoding": None}
    for name, decode in found.items():
        for fmt, data in (("PNG", png), ("JPEG", jpeg)):
            if fmt not in FORMATS.get(name, ("PNG", "JPEG")):
                continue
            stop = threading.Event()
            worker = threading.Thread(target=spin, args=(decode, data, stop))
            worker.start()
            waits = delays(1.0)
            stop.set()
            worker.join()
            result[f"{name} {fmt}"] = [round(waits[len(waits) // 2], 2), round(waits[9 * len(waits) // 10], 2)]
    waits = delays(0.5)
    result["no decoding"] = [round(waits[len(waits) // 2], 2), round(waits[9 * len(waits) // 10], 2)]
    return result


def agreement(cases: int, seed: int) -> dict:
    """read_image with and without io/fast_decode.py on the same fuzz cases: verdicts and pixels."""
    installed, rng, seeds = fast_decode.decoders, random.Random(seed), hostile.fuzz_seeds()
    counts = {"same pixels": 0, "both refused, same message": 0, "differ": 0}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(cases):
            source = seeds[i % len(seeds)]
            path = Path(folder) / ("case.png" if source[:8] == hostile.PNG_SIGNATURE else "case.jpg")
            path.write_bytes(hostile.mutate(source, rng))
            out = []
            for decoders in (dict, installed):
                try:
                    out.append(read_with(decoders, path))
                except ImageReadError as err:
                    out.append(str(err))
            if isinstance(out[0], str) and out[0] == out[1]:
                counts["both refused, same message"] += 1
            elif not isinstance(out[0], str) and not isinstance(out[1], str) and np.array_equal(out[0], out[1]):
                counts["same pixels"] += 1
            else:
                counts["differ"] += 1
    fast_decode.decoders = installed
    return counts


CHILD = """
import sys, json
sys.path.insert(0, {bench!r})
from decode_candidates import decoders
decode = decoders()[sys.argv[1]]
decoded = refused = 0
for path in sys.argv[2:]:
    try:
        decode(open(path, "rb").read())
        decoded += 1
    except Exception:
        refused += 1
print(json.dumps({{"decoded": decoded, "refused": refused}}))
"""


def safety(found: dict, cases: int, seed: int) -> dict:
    corpus = dict(hostile.hostile_files())
    rng = random.Random(seed)
    seeds = hostile.fuzz_seeds()
    for i in range(cases):
        corpus[f"fuzz{i}"] = hostile.mutate(rng.choice(seeds), rng)
    short = {name for name in corpus if "short" in name or "cut" in name}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for name, data in corpus.items():
            path = Path(folder) / f"{len(paths):05d}.bin"
            path.write_bytes(data)
            paths[name] = str(path)
        script = CHILD.format(bench=str(Path(__file__).resolve().parent))
        for name in found:
            crashes, counts = [], {"decoded": 0, "refused": 0}
            names = list(paths)
            for start in range(0, len(names), 200):  # a crash loses one batch: rerun it file by file
                batch = names[start:start + 200]
                done = subprocess.run([sys.executable, "-c", script, name, *(paths[n] for n in batch)],
                                      capture_output=True, text=True)
                if done.returncode == 0:
                    for key, value in json.loads(done.stdout).items():
                        counts[key] += value
                    continue
                for n in batch:
                    one = subprocess.run([sys.executable, "-c", script, name, paths[n]], capture_output=True, text=True)
                    if one.returncode < 0:
                        crashes.append(n)
                    elif one.returncode == 0:
                        for key, value in json.loads(one.stdout).items():
                            counts[key] += value
            silent = []
            for n in short:
                one = subprocess.run([sys.executable, "-c", script, name, paths[n]], capture_output=True, text=True)
                if one.returncode == 0 and json.loads(one.stdout)["decoded"]:
                    silent.append(n)
            results[name] = {**counts, "crashes": len(crashes), "crash_examples": crashes[:5],
                             "short_data_decoded_silently": silent}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad/bottle/"
                                                "test/broken_large/000.png"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fuzz", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png-cpu", nargs="*", metavar="FOLDER", default=None,
                        help="only read_image's CPU time on PNGs, before/after zlib-ng: the generated sizes and "
                             "the PNGs under each FOLDER (recursively)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    found = decoders()
    files = test_images(Path(args.source))
    if args.png_cpu is not None:
        sets = {}
        with tempfile.TemporaryDirectory() as folder:
            for label, data in files.items():
                if label.startswith("PNG"):
                    sets[label] = [Path(folder) / f"{len(sets)}.png"]
                    sets[label][0].write_bytes(data)
            for source in args.png_cpu:
                sets[source] = sorted(Path(source).rglob("*.png"))
            result = {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                      "read_image_png_cpu_ms": png_cpu(sets, args.repeats),
                      "GIL wait ms, no decoding": gil_wait(lambda: time.sleep(0.01), 0.5)}
        return write_result(result, args.output)
    files[f"PNG original {Path(args.source).name}"] = Path(args.source).read_bytes()
    result = {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "candidates": sorted(found), "ms_per_decode": speed(found, files, args.repeats),
              "gil_wait_ms_median_p90": gil(found, files),
              "read_image_agreement": agreement(args.fuzz, args.seed + 1),
              "safety": safety(found, args.fuzz, args.seed)}
    return write_result(result, args.output)


def write_result(result: dict, output: str | None) -> int:
    """The load after the run added to `result`, printed as JSON and written to `output` if given; exit status 0."""
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        Path(output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
