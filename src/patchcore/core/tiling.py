"""Tiles for feature extraction at high resolution: activation memory bounded by the tile, not the image.

A CNN feature at a grid position depends only on the input pixels in its receptive field. Extracting an
image tile by tile gives the features a single pass would give, except within a border band of each tile
where the receptive field crosses the tile's edge and sees zero padding instead of the neighbouring pixels.
So tiles overlap, and each tile contributes only its interior: the seams between the parts two
neighbouring tiles keep lie in the middle of their overlap, at least overlap / 2 pixels from either tile's
edge. With an overlap of twice the receptive-field radius the stitched grid equals the single pass
exactly; with less, features within (radius - overlap / 2) of a seam differ slightly (tested and measured
in tests/test_tiling.py). Image borders are image borders in both cases.

Tile starts and seams are multiples of `align` (the backbone's deepest stride): every tile then sees the
same downsampling phase as the single pass, so its grid positions line up with the full grid's.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileSpan:
    """One tile along one axis, in input pixels: the tile covers [start, end); it contributes the grid
    rows (or columns) [keep_from, keep_to) of the full image's finest grid (grid units)."""

    start: int
    end: int
    keep_from: int
    keep_to: int


def tile_spans(length: int, tile: int, overlap: int, *, align: int, stride: int) -> list[TileSpan]:
    """Tiles covering [0, length) along one axis; their kept grid ranges partition [0, length // stride).

    length, tile and overlap are in input pixels; `align` (the deepest feature stride) must divide length
    and tile; `stride` (the finest feature stride, that of the grid) must divide align.
    """
    if align % stride:
        raise ValueError(f"the deepest stride {align} must be a multiple of the finest {stride}")
    if length % align or tile % align:
        raise ValueError(f"tiling needs the input side ({length}) and the tile ({tile}) to be multiples of "
                         f"the backbone's deepest stride {align}")
    if length <= tile:
        return [TileSpan(0, length, 0, length // stride)]
    step = (tile - overlap) // align * align
    if step <= 0:
        raise ValueError(f"tile overlap {overlap} leaves no step for tile {tile} (aligned to {align})")
    starts = list(range(0, length - tile, step)) + [length - tile]
    seams = [0]
    for left, right in zip(starts, starts[1:]):
        # the middle of the overlap of [left, left + tile) and [right, right + tile), on the grid
        seams.append(round((right + left + tile) / 2 / stride))
    seams.append(length // stride)
    return [TileSpan(s, s + tile, a, b) for s, a, b in zip(starts, seams, seams[1:])]
