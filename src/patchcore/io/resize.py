"""The model input's resize: antialiased bilinear in 8 bit, Pillow's kernel, for the library on CPU and for the
torch-free runtime alike.

One kernel for both paths because the scores are sensitive to it: torch's uint8 antialiased kernel (a port
of Pillow's) rounds differently on ~0.1% of pixels, by one grey level, and on MVTec bottle (Lite0, 900 ->
256) that moved image scores by up to 0.9% between the two paths; with one kernel they agree to 3e-7.

Pillow resizes in two passes, each rounded to 8 bit, and since Pillow 13 picks their order from the sizes
(vertical first where the height shrinks much more than the width): the same call gives other bytes on other
Pillow versions. Here the passes are two Pillow calls in a fixed order, horizontal then vertical (every Pillow
before 13, and Pillow 13 on proportional resizes such as the MVTec geometry), so a model scores the same pixels
whichever Pillow >= 10 is installed.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from PIL import Image

_BILINEAR = Image.Resampling.BILINEAR


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 at size (h, w): bilinear with antialiasing (Pillow's BILINEAR, which
    widens its support when shrinking, as the MVTec protocol code's PIL resize), horizontal pass first."""
    return resize_crop_rgb(image, size, (0, 0, size[0], size[1]))


def resize_crop_rgb(image: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """resize_rgb(image, size)[top:top + h, left:left + w] for box (top, left, h, w), byte for byte, computing
    only the kept pixels where Pillow's arithmetic allows it (the MVTec geometry 900 -> 256, crop 224: 0.77x
    the time of resizing all of it).

    Pillow resizes a source span to an output size with, per output pixel, the centre in0 + (x + 0.5) * scale
    in double precision (the span's ends as C floats), and that centre alone decides the pixel's taps and
    weights. Asking for the crop's source span gives the full resize's centres when each is computed exactly
    (scale a dyadic fraction, as in / 256 is; the ends exact in float32). An axis where that cannot be shown is
    resized whole and cropped afterwards.
    """
    height, width = image.shape[:2]
    top, left, crop_h, crop_w = box
    if (height, width) == tuple(size):
        return image[top:top + crop_h, left:left + crop_w]
    rows = _exact_source_span(height, size[0], top, crop_h)
    cols = _exact_source_span(width, size[1], left, crop_w)
    (y0, y1), out_h, keep_top = (rows, crop_h, 0) if rows else ((0.0, float(height)), size[0], top)
    (x0, x1), out_w, keep_left = (cols, crop_w, 0) if cols else ((0.0, float(width)), size[1], left)
    # The horizontal pass runs only on the source rows the vertical pass reads (as Pillow's single call does).
    # Shifting an exact span down by whole rows keeps it exact (same fraction bits, a smaller whole part), so
    # every centre moves by exactly that many rows and keeps its taps and weights.
    first, last = _source_rows(height, y0, y1, out_h) if rows else (0, height)
    y0, y1 = y0 - first, y1 - first
    picture = Image.fromarray(image[first:last])
    if out_w != width or cols:  # each call below is one pass: its other axis keeps its size and whole span
        picture = picture.resize((out_w, last - first), _BILINEAR, box=(x0, 0.0, x1, float(last - first)))
    if out_h != height or rows:
        picture = picture.resize((out_w, out_h), _BILINEAR, box=(0.0, y0, float(out_w), y1))
    return np.asarray(picture)[keep_top:keep_top + crop_h, keep_left:keep_left + crop_w]


def _exact_source_span(in_size: int, out_size: int, start: int, length: int) -> tuple[float, float] | None:
    """The source span (in0, in1) of output pixels [start, start + length) of an in_size -> out_size resize if
    Pillow computes every one of their centres exactly from it, as it does the full resize's; None where
    nothing is cropped on this axis or exactness cannot be shown."""
    if length == out_size or in_size == out_size:  # nothing to crop, or a crop without resizing (a slice)
        return None
    scale = Fraction(in_size, out_size)
    if scale.denominator & (scale.denominator - 1):  # not dyadic: its double is rounded
        return None
    in0, in1 = scale * start, scale * (start + length)
    # in0 and in1 reach C as floats; scale = (double)(in1 - in0) / length, the difference taken in float.
    if any(Fraction(float(np.float32(v))) != v for v in (in0, in1, in1 - in0)):
        return None
    # Each centre is then a dyadic fraction with a denominator <= 2 x scale's, exact in a double while its
    # numerator fits 53 bits (always for sizes under MAX_PIXELS; checked all the same).
    if (4 * (in_size + 1) * scale.denominator).bit_length() > 52:
        return None
    return float(in0), float(in1)


def _source_rows(in_size: int, in0: float, in1: float, out_size: int) -> tuple[int, int]:
    """[first, last) source rows a vertical pass over span (in0, in1) reads: Pillow's bounds (precompute_coeffs)
    of the first and the last output row, in the same double arithmetic."""
    scale = (in1 - in0) / out_size
    support = max(scale, 1.0)  # the bilinear filter's support, widened when shrinking

    def bounds(row: int) -> tuple[int, int]:
        centre = in0 + (row + 0.5) * scale
        return max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)

    return bounds(0)[0], bounds(out_size - 1)[1]
