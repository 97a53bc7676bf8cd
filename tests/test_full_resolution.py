"""Maps at the input image's own size: the resize and the crop undone, unseen pixels marked as unseen."""
from __future__ import annotations

import torch

from patchcore import PatchCore, PatchCoreConfig


def test_maps_go_back_to_the_original_geometry_with_the_crop_marked_unseen():
    model = PatchCore(PatchCoreConfig(backbone="resnet18_random", resize=64, crop=32), device="cpu")
    maps = torch.arange(32 * 32, dtype=torch.float32).view(1, 32, 32)
    full = model.maps_at_original_size(maps, (128, 160))  # resized to 64 x 80, crop 32 x 32 at (16, 24)
    assert full.shape == (1, 128, 160)
    seen = ~torch.isnan(full[0])
    rows, cols = seen.nonzero()[:, 0], seen.nonzero()[:, 1]
    assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == (32, 96, 48, 112)
    inside = full[0, 32:96, 48:112]
    expected = torch.nn.functional.interpolate(maps[:, None], size=(64, 64), mode="bilinear",
                                               align_corners=False)[0, 0]
    torch.testing.assert_close(inside, expected)


def test_identity_geometry_returns_the_map_itself():
    model = PatchCore(PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None), device="cpu")
    maps = torch.rand(2, 40, 56)
    torch.testing.assert_close(model.maps_at_original_size(maps, (40, 56)), maps)
