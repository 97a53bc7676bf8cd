"""Tiled feature extraction: tiles cover the grid exactly once, and the stitched grid is the single pass's."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from patchcore import PatchCore, PatchCoreConfig
from patchcore.core.tiling import tile_spans
from patchcore.errors import InputError
from patchcore.estimator.extractor import FeatureExtractor

CPU = torch.device("cpu")


@pytest.mark.parametrize("length, tile, overlap", [(512, 128, 32), (512, 128, 64), (320, 160, 96), (96, 128, 32),
                                                   (1024, 256, 128), (400, 160, 0), (160, 160, 64)])
def test_kept_ranges_partition_the_grid_and_seams_sit_inside_overlaps(length, tile, overlap):
    spans = tile_spans(length, tile, overlap, align=16, stride=8)
    kept = [i for s in spans for i in range(s.keep_from, s.keep_to)]
    assert kept == list(range(length // 8))  # every grid row exactly once, in order
    for span in spans:
        assert span.start % 16 == 0 and span.end - span.start == min(tile, length) and span.end <= length
        # a kept row's pixels lie inside the tile, at least overlap / 2 (less rounding) from an inner edge
        assert span.start <= span.keep_from * 8 and span.keep_to * 8 <= span.end
        if span.start > 0:
            assert span.keep_from * 8 - span.start >= overlap // 2 - 8
        if span.end < length:
            assert span.end - span.keep_to * 8 >= overlap // 2 - 8


def test_misaligned_sizes_are_refused_clearly():
    with pytest.raises(ValueError, match="multiples of the backbone's deepest stride 16"):
        tile_spans(500, 128, 32, align=16, stride=8)
    with pytest.raises(ValueError, match="leaves no step"):
        tile_spans(512, 128, 120, align=16, stride=8)


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (1, 3, height, width), generator=g).float()
    return torch.nn.functional.avg_pool2d(noise, 5, 1, 2).round().to(torch.uint8)


def test_stitched_grid_equals_the_single_pass_when_the_overlap_covers_the_receptive_field():
    """resnet18 to stride 16 plus the 3x3 aggregation: an overlap of 96 pixels leaves every kept feature's
    receptive field inside its tile, so the tiles reproduce the single pass up to float rounding."""
    base = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None)
    image = _image(320, 256)
    full = FeatureExtractor(base, CPU)(image)
    tiled_extractor = FeatureExtractor(dataclasses.replace(base, tile_size=160, tile_overlap=96), CPU)
    tiled = tiled_extractor(image)
    assert tiled.grid == full.grid == (40, 32) and tiled.input_size == full.input_size
    expected = len(tile_spans(320, 160, 96, align=16, stride=8)) * len(tile_spans(256, 160, 96, align=16, stride=8))
    assert len(list(tiled_extractor.pieces(image)[2])) == expected == 12  # 4 x 3 tiles, not one pass
    torch.testing.assert_close(tiled.features, full.features, rtol=1e-4, atol=1e-5)


def test_a_small_overlap_differs_only_near_the_seams():
    """With less overlap, features near a seam see zero padding instead of the neighbouring tile; those
    away from seams are unchanged. This is the border the README documents."""
    base = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None)
    image = _image(256, 256, seed=1)
    full = FeatureExtractor(base, CPU)(image).features[0].view(32, 32, -1)
    tiled = FeatureExtractor(dataclasses.replace(base, tile_size=128, tile_overlap=32), CPU)(image)
    rel = ((tiled.features[0].view(32, 32, -1) - full).norm(dim=-1) / full.norm(dim=-1))
    seams = [s.keep_from for s in tile_spans(256, 128, 32, align=16, stride=8)[1:]]
    far = torch.ones(32, dtype=torch.bool)
    for seam in seams:
        far[max(0, seam - 6):seam + 6] = False
    away = far[:, None] & far[None, :]
    assert float(rel[away].max()) < 1e-4
    assert float(rel[~away].max()) > 1e-3  # the seams are where tiling shows; this test can tell


def test_tiled_model_scores_like_the_single_pass_model(category, train_paths):
    """The whole estimator with tiles (fit and predict piece by piece) against one without."""
    base = PatchCoreConfig(backbone="resnet18_random", resize=(128, 160), crop=None, coreset_ratio=0.2,
                           calibration_ratio=0.0, batch_size=4)
    tests = sorted((category / "test").glob("*/*.png"))[::2]
    one = PatchCore(base, device="cpu").fit(train_paths[:8])
    tiled = PatchCore(dataclasses.replace(base, tile_size=96, tile_overlap=64), device="cpu").fit(train_paths[:8])
    assert tiled.memory_bank_.shape == one.memory_bank_.shape and tiled.grid_ == one.grid_ == (16, 20)
    a, b = one.predict(tests), tiled.predict(tests)
    assert a.maps.shape == b.maps.shape == (len(tests), 128, 160)
    assert torch.corrcoef(torch.stack([a.scores, b.scores]))[0, 1] > 0.98


def test_a_size_that_cannot_be_tiled_is_a_per_input_error():
    config = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None, tile_size=64, tile_overlap=32)
    with pytest.raises(InputError, match="cannot tile a 100x96 model input"):
        FeatureExtractor(config, CPU)(_image(100, 96))


def test_tiling_is_saved_with_the_model_and_absent_when_unused(tmp_path, train_paths):
    config = PatchCoreConfig(backbone="resnet18_random", resize=64, crop=None, coreset_ratio=0.5,
                             calibration_ratio=0.0, tile_size=48, tile_overlap=16)
    model = PatchCore(config, device="cpu").fit(train_paths[:3])
    model.save(tmp_path / "tiled.model")
    assert PatchCore.load(tmp_path / "tiled.model", device="cpu").config == config
    assert "tile_size" not in PatchCoreConfig().to_dict()  # untiled models keep the format-1 bytes
    assert PatchCoreConfig().to_dict().keys() == PatchCoreConfig.from_dict(PatchCoreConfig().to_dict()).to_dict().keys()
