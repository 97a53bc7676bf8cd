"""A small synthetic inspection set in MVTec AD layout: woven-fabric textures, some with pasted defects.

Used by `patchcore demo` (a newcomer needs no data of their own) and by the end-to-end tests.
Layout: <root>/train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_KINDS = ("scratch", "stain", "hole")


def fabric_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A nominal image: a woven pattern with random phase, slight rotation of colour and sensor noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 8.0
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, size=2)
    warp = np.sin(2 * np.pi * x / period + phase_x)
    weft = np.sin(2 * np.pi * y / period + phase_y)
    weave = 0.5 + 0.25 * np.where((np.floor(x / period) + np.floor(y / period)) % 2 == 0, warp, weft)
    colour = np.array([0.75, 0.62, 0.45]) * rng.uniform(0.95, 1.05, size=3)
    image = weave[..., None] * colour[None, None, :] + rng.normal(0, 0.02, size=(size, size, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def paste_defect(image: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` at a random place -> (image, mask bool (H, W)); its size follows the
    shorter side."""
    height, width = image.shape[:2]
    size = min(height, width)
    picture = Image.fromarray(image)
    mask = Image.new("L", picture.size, 0)
    draw, mask_draw = ImageDraw.Draw(picture), ImageDraw.Draw(mask)
    cx, cy = rng.integers([width // 5, height // 5], [width - width // 5, height - height // 5], size=2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = size * rng.uniform(0.12, 0.2)
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
        width = max(3, size // 20)
        draw.line(line, fill=(25, 25, 30), width=width)
        mask_draw.line(line, fill=255, width=width)
    elif kind == "stain":
        r = size * rng.uniform(0.06, 0.1)
        box = [cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r]
        draw.ellipse(box, fill=(60, 110, 160))
        mask_draw.ellipse(box, fill=255)
    elif kind == "hole":
        r = size * rng.uniform(0.05, 0.08)
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=(8, 8, 8))
        mask_draw.ellipse(box, fill=255)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    return np.asarray(picture), np.asarray(mask) > 0


def make_category(root: str | Path, *, n_train: int = 30, n_test_good: int = 6, n_test_per_defect: int = 4,
                  size: int = 128, seed: int = 0, sizes: Sequence[tuple[int, int]] | None = None) -> Path:
    """Write a synthetic category in MVTec AD layout under `root` and return `root`.

    `sizes`: (H, W) of the images in turn (elongated, rotated, varied, tiny ...) instead of size x size."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    shapes = itertools.cycle(sizes or [(size, size)])

    def texture() -> np.ndarray:  # the next shape, cut from a square texture
        height, width = next(shapes)
        return fabric_texture(rng, max(height, width))[:height, :width].copy()

    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    (root / "test" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(texture()).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        Image.fromarray(texture()).save(root / "test" / "good" / f"{i:03d}.png")
    for kind in DEFECT_KINDS:
        (root / "test" / kind).mkdir(parents=True, exist_ok=True)
        (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n_test_per_defect):
            image, mask = paste_defect(texture(), rng, kind)
            Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root
