"""The working geometry: at what scale the model looks at the part.

The MVTec protocol (resize the shorter side to 256, centre crop 224) suits square images of one size. On
elongated or varied-size parts its crop hides most of the part: a part 500 wide and 1250 tall resizes to
256 x 640 and the crop keeps 224 x 224 of it, a third. With `geometry="auto"` (the default) and the
protocol's resize and crop left at their defaults, fit looks at the training images' sizes first: all
square and of one size -> the protocol, unchanged; otherwise (one non-square size, or many sizes and
shapes) one scale factor for every image, chosen so the median training image has about `pixel_budget`
pixels: each image keeps its aspect and gets its own feature grid, and a defect keeps its size in
features from image to image (crops of one camera share a pixel size). Test images of any size are scored
at that scale. Explicit `scale`, `resize` or `crop` values are always used as given; `geometry="mvtec"`
keeps the protocol whatever the images.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import torch
from PIL import Image

from ..config import DEFAULT_RESIZE_CROP, PatchCoreConfig
from ..errors import ImageReadError
from ..io.images import header_size
from ..io.sizing import (
    MAX_ASPECT_MISMATCH,  # noqa: F401 - re-exported
    resized_size,
)
from ..io.sizing import aspect_mismatch as sizing_aspect_mismatch

MVTEC = DEFAULT_RESIZE_CROP  # (resize, crop) of the protocol, PatchCoreConfig's defaults


def image_sizes(images: list) -> list[tuple[int, int]]:
    """(H, W) of each image, from the file header for paths (no decoding); unreadable files are left out
    here (fit reports them when it decodes)."""
    sizes = []
    for image in images:
        if isinstance(image, (str, Path)):
            try:
                height, width = header_size(image)  # the header only, EXIF orientation applied
            except ImageReadError:  # decoding names the file and fit skips it
                continue
        elif isinstance(image, Image.Image):
            width, height = image.size
        elif isinstance(image, torch.Tensor):  # (3, H, W)
            height, width = image.shape[-2:]
        else:  # an (H, W) or (H, W, C) array
            height, width = image.shape[:2]
        sizes.append((int(height), int(width)))
    return sizes


def choose_scale(sizes: list[tuple[int, int]], pixel_budget: int) -> float:
    """One factor for every image: the median training image (by area) gets about pixel_budget pixels.
    Four significant digits, so the saved config reads plainly."""
    area = statistics.median(h * w for h, w in sizes)
    return float(f"{math.sqrt(pixel_budget / area):.4g}")


def resolve_geometry(config: PatchCoreConfig, images: list) -> tuple[PatchCoreConfig, str]:
    """The config fit uses, and one line saying which geometry it chose and why."""
    align = config.feature_strides[-1]
    if config.scale is not None:
        return config, (f"one scale for every image: x{config.scale:g}, aspect kept, sides multiples of {align} "
                        "(as given)")
    if (config.resize, config.crop) != MVTEC:
        return config, f"resize {_text(config.resize)}, crop {_text(config.crop)} (as given)"
    if config.geometry == "mvtec":
        return config, "MVTec protocol: resize 256 (shorter side), centre crop 224 (geometry mvtec)"
    sizes = image_sizes(images)
    if not sizes or (len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1]):
        return config, "MVTec protocol: resize 256 (shorter side), centre crop 224 (square training images)"
    scale = choose_scale(sizes, config.pixel_budget)
    chosen = dataclasses.replace(config, scale=scale)  # resize and crop become None (config.py)
    median = sorted(sizes, key=lambda s: s[0] * s[1])[len(sizes) // 2]
    lands = resized_size(*median, None, scale=scale, align=align)
    kinds = len(set(sizes))
    seen = (f"one size {sizes[0][0]}x{sizes[0][1]}" if kinds == 1 else
            f"{kinds} sizes from {min(h for h, _ in sizes)} to {max(h for h, _ in sizes)} high and "
            f"{min(w for _, w in sizes)} to {max(w for _, w in sizes)} wide, H/W {min(h / w for h, w in sizes):.2f} "
            f"to {max(h / w for h, w in sizes):.2f}")
    return chosen, (f"whole part at one scale: x{scale:g} for every image, aspect kept, sides multiples of {align} "
                    f"(a median image {median[0]}x{median[1]} -> {lands[0]}x{lands[1]}, about {config.pixel_budget} "
                    f"pixels), for training images of {seen} (H x W); images of other sizes are scored at the "
                    "same scale. --scale or --resize/--crop override, --geometry mvtec keeps the MVTec protocol")


def aspect_mismatch(config: PatchCoreConfig, height: int, width: int) -> str | None:
    """Why an H x W image cannot be scored at this geometry (exact resize, no crop), or None (io/sizing.py)."""
    return sizing_aspect_mismatch(height, width, config.resize, config.crop)


def _text(value) -> str:
    if value is None:
        return "none"
    return str(value) if isinstance(value, int) else f"{value[0]}x{value[1]}"
