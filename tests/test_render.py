"""Heatmap colours and overlays against a direct computation."""
from __future__ import annotations

import numpy as np

from patchcore.io.render import _STOPS, UNSEEN_GREY, colormap, overlay


def test_the_colour_table_matches_direct_interpolation_within_one_level():
    values = np.random.default_rng(0).uniform(-0.2, 1.2, (64, 64)).astype(np.float32)
    clipped = np.clip(values, 0, 1)
    direct = (np.stack([np.interp(clipped, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], -1) * 255).round()
    assert np.abs(colormap(values).astype(int) - direct.astype(int)).max() <= 1


def test_unseen_pixels_are_grey_and_overlays_blend():
    values = np.full((4, 4), 0.5, np.float32)
    values[0] = np.nan
    heat = colormap(values)
    assert (heat[0] == UNSEEN_GREY).all() and not (heat[1:] == UNSEEN_GREY).all()
    image = np.zeros((4, 4, 3), np.uint8)
    blended = overlay(image, heat, alpha=0.5)
    assert np.array_equal(blended, np.rint(0.5 * heat.astype(np.float32)).astype(np.uint8))
    mask = np.zeros((4, 4), bool)
    mask[1:4, 1:4] = True
    outlined = overlay(image, heat, mask, alpha=0.5)
    assert (outlined[1, 1] == 255).all() and not (outlined[0, 0] == 255).all()
