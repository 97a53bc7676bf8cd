"""Where an H x W image lands at the model input: the size rules of preprocessing, as plain arithmetic.

No torch here: the estimator's Preprocess and the torch-free scoring runtime both call these, so the two
can never disagree about an image's model-input size, its crop or its feature grid.

Four resize rules (PatchCoreConfig.resize / .scale):
- scale s: every image by the same factor, aspect kept, sides rounded to a multiple of `align` (the
  deepest feature stride, so every level's grid covers the input exactly; at least one `align`). Crops of
  different sizes from one camera share a pixel size; one factor keeps a defect the same size in features.
- an int: the shorter side to that many pixels, aspect kept (torchvision's rule; per image, so the scale
  changes from image to image).
- (H, W): an exact size (aspect changed to the model's).
- None: each image at its own size.
then an optional centre crop (int or (H, W)).
"""
from __future__ import annotations

import math

Size = tuple[int, int]


def pair(value: tuple[int, int] | int) -> Size:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def scaled_side(side: int, scale: float, align: int) -> int:
    """One side under the scale rule: side * scale rounded half up to a multiple of align, at least align."""
    return max(align, int(math.floor(side * scale / align + 0.5)) * align)


def resized_size(height: int, width: int, resize: tuple[int, int] | int | None, *, scale: float | None = None,
                 align: int = 1) -> Size:
    """The size after the resize step (before any crop)."""
    if scale is not None:
        return scaled_side(height, scale, align), scaled_side(width, scale, align)
    if resize is None:
        return height, width
    if isinstance(resize, int):  # shorter side -> resize, aspect kept (torchvision rule)
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(resize * long / short)
        return (resize, new_long) if height <= width else (new_long, resize)
    return pair(resize)


def crop_box(resized: Size, crop: tuple[int, int] | int | None) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the centre crop inside a resized image; None if the crop does not fit."""
    if crop is None:
        return 0, 0, resized[0], resized[1]
    ch, cw = pair(crop)
    if ch > resized[0] or cw > resized[1]:
        return None
    return int(round((resized[0] - ch) / 2.0)), int(round((resized[1] - cw) / 2.0)), ch, cw


def feature_grid(input_size: Size, stride: int) -> Size:
    """(h, w) of a level at this stride over an (H', W') model input: ceil, as padded convolutions give."""
    return -(-input_size[0] // stride), -(-input_size[1] // stride)


# Bounds on one image's model input, shared by the library (io/preprocess.py) and the torch-free runtime.
MAX_RESIZED_PIXELS = 6144 * 6144  # 37.7 Mpx: a 20-megapixel image at its own size fits, with tiles
# With an exact H,W resize, an image whose aspect ratio is this much off the model's would be distorted past
# recognition: it is refused (per file) instead of scored.
MAX_ASPECT_MISMATCH = 1.25


def aspect_mismatch(height: int, width: int, resize, crop) -> str | None:
    """Why an H x W image cannot be scored by an exact-size model (resize H,W, no crop), or None."""
    if crop is not None or not isinstance(resize, tuple):
        return None
    model_aspect = resize[0] / resize[1]
    ratio = (height / width) / model_aspect
    if max(ratio, 1 / ratio) <= MAX_ASPECT_MISMATCH:
        return None
    return (f"its aspect ratio (H/W {height / width:.2f}) is not the model's ({model_aspect:.2f}, resize "
            f"{resize[0]}x{resize[1]}): it would be distorted by more than {MAX_ASPECT_MISMATCH:.2f}x; fit a model "
            "for this geometry")


def check_model_input(height: int, width: int, resize, crop, *, scale: float | None = None, align: int = 1,
                      exact_aspect: bool = False) -> tuple[int, int, int, int]:
    """The (top, left, h, w) crop box of an H x W image's model input, or InputError naming why the image cannot
    be scored: empty, larger than MAX_RESIZED_PIXELS once resized (PATCHCORE_MAX_RESIZED_PIXELS raises it),
    smaller than the crop, or (exact_aspect) of another aspect than an exact-size model's."""
    from ..errors import InputError
    from .images import limit

    if height < 1 or width < 1:
        raise InputError(f"empty image ({height} x {width} pixels)")
    size = resized_size(height, width, resize, scale=scale, align=align)
    cap = limit("MAX_RESIZED_PIXELS", MAX_RESIZED_PIXELS)
    if size[0] * size[1] > cap:
        raise InputError(f"a {height} x {width} image resizes to {size[0]} x {size[1]} = "
                         f"{size[0] * size[1]} pixels, above the limit of {cap:.0f} pixels "
                         f"(MAX_RESIZED_PIXELS; raise it with PATCHCORE_MAX_RESIZED_PIXELS=<pixels>, or set a "
                         f"fixed --resize H,W)")
    box = crop_box(size, crop)
    if box is None:
        ch, cw = pair(crop)
        raise InputError(f"crop {ch}x{cw} is larger than the resized image {size[0]}x{size[1]}")
    problem = aspect_mismatch(height, width, resize, crop) if exact_aspect else None
    if problem is not None:
        raise InputError(f"a {height} x {width} image: {problem}")
    return box
