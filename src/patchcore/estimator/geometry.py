"""The working geometry: at what size the model looks at the part.

The MVTec protocol (resize the shorter side to 256, centre crop 224) suits square images of one size. On
elongated or varied-size parts its crop hides most of the part: a part 500 wide and 1250 tall resizes to
256 x 640 and the crop keeps 224 x 224 of it, a third. With `geometry="auto"` (the default) and the
protocol's resize and crop left at their defaults, fit looks at the training images' sizes first: all
square and of one size -> the protocol, unchanged; otherwise the whole part, resized to the training
images' median aspect ratio within `pixel_budget` pixels, sides multiples of 16, no crop. Explicit
`resize`/`crop` values are always used as given; `geometry="mvtec"` keeps the protocol whatever the images.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import torch
from PIL import Image

from ..config import PatchCoreConfig
from ..errors import ImageReadError
from ..io.images import header_size

MVTEC = (256, 224)  # (resize, crop) of the protocol, PatchCoreConfig's defaults
ALIGN = 16  # sides are multiples of this, the deepest default feature stride (tiling needs it)
# With an exact H,W resize, an image whose aspect ratio is this much off the model's would be distorted
# past recognition: it is refused (per file) instead of scored.
MAX_ASPECT_MISMATCH = 1.25


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


def whole_part_size(sizes: list[tuple[int, int]], pixel_budget: int) -> tuple[int, int]:
    """(H, W) at the median aspect ratio, H * W <= pixel_budget, sides multiples of ALIGN (at least ALIGN):
    of the aligned sizes around the exact one, the one within the budget closest in aspect."""
    aspect = statistics.median(h / w for h, w in sizes)  # height / width
    width = math.sqrt(pixel_budget / aspect)
    height = aspect * width
    options = [(max(ALIGN, h), max(ALIGN, w))
               for h in (int(height) // ALIGN * ALIGN, -(-int(height) // ALIGN) * ALIGN)
               for w in (int(width) // ALIGN * ALIGN, -(-int(width) // ALIGN) * ALIGN)]
    within = [o for o in options if o[0] * o[1] <= pixel_budget] or [min(options, key=lambda o: o[0] * o[1])]
    return min(within, key=lambda o: (abs(math.log(o[0] / o[1] / aspect)), -o[0] * o[1]))


def resolve_geometry(config: PatchCoreConfig, images: list) -> tuple[PatchCoreConfig, str]:
    """The config fit uses, and one line saying which geometry it chose and why."""
    if (config.resize, config.crop) != MVTEC:
        return config, f"resize {_text(config.resize)}, crop {_text(config.crop)} (as given)"
    if config.geometry == "mvtec":
        return config, "MVTec protocol: resize 256 (shorter side), centre crop 224 (geometry mvtec)"
    sizes = image_sizes(images)
    if not sizes or (len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1]):
        return config, "MVTec protocol: resize 256 (shorter side), centre crop 224 (square training images)"
    height, width = whole_part_size(sizes, config.pixel_budget)
    shown = ", ".join(f"{h}x{w}" for h, w in sorted(set(sizes))[:3]) + (" ..." if len(set(sizes)) > 3 else "")
    chosen = dataclasses.replace(config, resize=(height, width), crop=None)
    return chosen, (f"whole part: resize {height}x{width} (H x W), no crop, within {config.pixel_budget} pixels, "
                    f"for training images of {shown} (H x W); --resize/--crop override, --geometry mvtec "
                    "keeps the MVTec protocol")


def aspect_mismatch(config: PatchCoreConfig, height: int, width: int) -> str | None:
    """Why an H x W image cannot be scored at this geometry (exact resize, no crop), or None."""
    if config.crop is not None or not isinstance(config.resize, tuple):
        return None
    model_aspect = config.resize[0] / config.resize[1]
    ratio = (height / width) / model_aspect
    if max(ratio, 1 / ratio) <= MAX_ASPECT_MISMATCH:
        return None
    return (f"its aspect ratio (H/W {height / width:.2f}) is not the model's ({model_aspect:.2f}, resize "
            f"{config.resize[0]}x{config.resize[1]}): it would be distorted by more than "
            f"{MAX_ASPECT_MISMATCH:.2f}x; fit a model for this geometry")


def _text(value) -> str:
    if value is None:
        return "none"
    return str(value) if isinstance(value, int) else f"{value[0]}x{value[1]}"
