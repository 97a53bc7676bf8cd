"""High-resolution inspection, measured (issue 12): which resolution finds what, at what cost.

    python benchmarks/highres.py synthetic --workdir /tmp/highres -o synthetic.json
    python benchmarks/highres.py twenty-mp --workdir /tmp/highres -o twenty_mp.json
    python benchmarks/highres.py bottle --data ../shared/data/mvtec_ad/bottle --workdir /tmp/highres -o bottle.json

synthetic: 2048 x 2048 woven textures with round dark defects 4, 8 and 16 pixels across (anywhere in the
image); each geometry is fitted on the same 12 good images and scored on 6 good + 6 per defect size:
detection rate per size at the model's own threshold, image AUROC per size, pixel metrics at full size.
twenty-mp: peak resident memory of `patchcore predict` on one 5472 x 3648 (20 Mpx) image at its own size
with 512-pixel tiles, in a child process.
bottle: `patchcore evaluate` at the MVTec 224 crop, at 448 and at the native size by tiles (896, the
nearest multiple of 16 below 900), pixel metrics at full resolution, per defect type.
Every run is a child process (`patchcore evaluate` / `predict`), so each peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FAST = ["--backbone", "efficientnet_lite0", "--device", "cpu", "--quiet"]
GEOMETRIES = {
    "224 (MVTec crop)": [],
    "native by tiles": ["--resize", "none", "--crop", "none", "--tile-size", "512", "--tile-overlap", "128"],
}
BOTTLE = {
    "224 (MVTec crop)": [],
    "448 (resize 512, crop 448)": ["--resize", "512", "--crop", "448"],
    "native 896 by tiles": ["--resize", "896", "--crop", "none", "--tile-size", "448", "--tile-overlap", "128"],
}


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    from patchcore.evaluation.synthetic import fabric_texture

    return fabric_texture(rng, size)


def spot(image: np.ndarray, rng: np.random.Generator, diameter: int) -> tuple[np.ndarray, np.ndarray]:
    """A round dark defect `diameter` pixels across, anywhere in the image -> (image, mask)."""
    size = image.shape[0]
    cx, cy = rng.integers(diameter, size - diameter, size=2)
    r = diameter / 2
    picture, mask = Image.fromarray(image), Image.new("L", (size, size), 0)
    ImageDraw.Draw(picture).ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=(20, 20, 25))
    ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=255)
    return np.asarray(picture), np.asarray(mask)


def make_synthetic(root: Path, size: int = 2048, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    if (root / "done").exists():
        return root
    for i in range(12):
        (root / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(rng, size)).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(6):
        (root / "test" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(rng, size)).save(root / "test" / "good" / f"{i:03d}.png")
    for diameter in (4, 8, 16):
        kind = f"spot_{diameter:02d}px"
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            image, mask = spot(texture(rng, size), rng, diameter)
            Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
            Image.fromarray(mask).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    (root / "done").write_text("")
    return root


def run_child(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run `python -m patchcore.app.cli ARGS` -> (wall seconds, peak RSS MiB of that child, stderr tail)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "patchcore.app.cli", *args], stdout=subprocess.DEVNULL,
                                 stderr=err, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child so far
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        err.seek(0)
        log = err.read()[-2000:]
    if child.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({child.returncode}): {log}")
    return seconds, usage.ru_maxrss / 1024, log


def evaluate_geometries(data: Path, geometries: dict[str, list[str]], workdir: Path, extra: list[str]) -> dict:
    results = {}
    for name, options in geometries.items():
        out = workdir / ("eval_" + "".join(c if c.isalnum() else "_" for c in name))
        seconds, peak, _ = run_child(["evaluate", str(data), "-o", str(out), *FAST, *extra, *options, "--no-report"])
        record = json.loads((out / f"{data.name}.json").read_text())
        at = record["at_training_threshold"]
        flagged = {}
        if "threshold" in at:
            for t in record["n_images"]["test_by_type"]:
                scores = [i["score"] for i in record["images"] if i["defect_type"] == t]
                flagged[t] = sum(s > at["threshold"] for s in scores) / len(scores)
        results[name] = {
            "options": options, "metrics": record["metrics"], "per_defect_type": record["per_defect_type"],
            "flagged_at_threshold": flagged, "pixel_resolution": record["pixel_resolution"],
            "fit_s": record["timings"]["fit_seconds"], "coreset_s": record["timings"]["coreset_seconds"],
            "predict_ms_per_image": record["timings"]["predict_ms_per_image"],
            "n_patches": record["fit"]["n_patches"], "bank": record["fit"]["coreset_size"],
            "peak_rss_mib": peak, "wall_s": seconds,
        }
        print(json.dumps({name: results[name]}, indent=1), file=sys.stderr, flush=True)
    return results


def twenty_mp(workdir: Path) -> dict:
    rng = np.random.default_rng(0)
    train = workdir / "twenty_mp_train"
    train.mkdir(parents=True, exist_ok=True)
    for i in range(2):  # crops of the same texture: the bank only needs the right kind of features
        Image.fromarray(texture(rng, 1024)).save(train / f"{i}.png")
    big = workdir / "twenty_mp.png"
    tile = texture(rng, 1824)
    Image.fromarray(np.tile(tile, (2, 3, 1))[:3648, :5472]).save(big)  # 5472 x 3648 = 20.0 Mpx
    model = workdir / "twenty_mp.model"
    tiles = ["--resize", "none", "--crop", "none", "--tile-size", "512", "--tile-overlap", "128"]
    run_child(["fit", str(train), "-o", str(model), *FAST, *tiles, "--coreset-ratio", "0.01"])
    seconds, peak, log = run_child(["predict", str(model), str(big), "-o", str(workdir / "twenty_mp_out"), "--quiet",
                                    "--device", "cpu", "--overwrite"])
    return {"image": "5472 x 3648 (20.0 Mpx)", "tiles": "512, overlap 128", "predict_wall_s": seconds,
            "peak_rss_mib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["synthetic", "twenty-mp", "bottle"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/highres"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_ad/bottle"))
    parser.add_argument("--coreset-ratio", default="0.01")
    parser.add_argument("--only", default=None, help="run only the geometries whose name contains this")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    extra = ["--coreset-ratio", args.coreset_ratio]
    if args.what == "synthetic":
        result = evaluate_geometries(make_synthetic(args.workdir / "synthetic" / "spots"), GEOMETRIES,
                                     args.workdir, extra)
    elif args.what == "twenty-mp":
        result = twenty_mp(args.workdir)
    else:
        chosen = {k: v for k, v in BOTTLE.items() if args.only is None or args.only in k}
        result = evaluate_geometries(args.data.resolve(), chosen, args.workdir, extra)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
