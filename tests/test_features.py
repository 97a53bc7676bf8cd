"""Locally aware patch features: each step against a naive oracle (PATCHCORE.md section 1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patchcore.core.features import channel_pooling_matrix, level_dims, local_aggregate, patch_embeddings


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("c_in, c_out", [(8, 4), (10, 4), (7, 3), (13, 5), (5, 5), (1024, 512), (3, 7), (9, 1)])
def test_channel_pooling_matrix_equals_adaptive_avg_pool1d(c_in, c_out):
    x = torch.randn(6, c_in, generator=_gen(c_in * 100 + c_out), dtype=torch.float64)
    matrix = channel_pooling_matrix(c_in, c_out)
    assert matrix.shape == (c_in, c_out)
    expected = F.adaptive_avg_pool1d(x[:, None, :], c_out)[:, 0]
    torch.testing.assert_close(x @ matrix.double(), expected, rtol=1e-6, atol=1e-6)


def test_level_dims_share_and_cap():
    assert level_dims([512, 1024], 1024) == [512, 512]
    assert level_dims([40, 112], 1024) == [40, 112]  # never more than a level has
    assert level_dims([128, 256], 200) == [100, 100]


def _naive_local_mean(x: torch.Tensor, p: int) -> torch.Tensor:
    """Sum over the p x p neighbours that exist, divided by p * p (zero padding), one position at a time."""
    r = p // 2
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            window = x[:, :, max(0, i - r):min(h, i + r + 1), max(0, j - r):min(w, j + r + 1)]
            out[:, :, i, j] = window.sum(dim=(-2, -1)) / (p * p)
    return out


@pytest.mark.parametrize("p", [3, 5])
@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (1, 2, 4, 4), (1, 1, 2, 9)])
def test_local_aggregate_equals_naive_neighbourhood_mean(p, shape):
    x = torch.randn(*shape, generator=_gen(p + sum(shape)), dtype=torch.float64)
    out = local_aggregate(x, p)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _naive_local_mean(x, p), rtol=1e-10, atol=1e-10)


def test_local_aggregate_marks_the_border_by_zero_padding():
    # A constant map keeps its value inside; corners see 4 of 9 neighbours, edges 6 of 9.
    x = torch.full((1, 2, 5, 6), 3.0)
    out = local_aggregate(x, 3)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1])
    torch.testing.assert_close(out[..., 0, 0], torch.full((1, 2), 3.0 * 4 / 9))
    torch.testing.assert_close(out[..., 0, 2], torch.full((1, 2), 3.0 * 6 / 9))


def test_local_aggregate_p1_is_identity():
    x = torch.randn(1, 2, 3, 4, generator=_gen(1))
    assert torch.equal(local_aggregate(x, 1), x)


def _paper_order(feature_maps, out_dims, p):
    """The paper's order: aggregate at full width, upsample to level 1's grid, pool channels, concat."""
    h, w = feature_maps[0].shape[-2:]
    levels = []
    for fmap, dim in zip(feature_maps, out_dims):
        agg = _naive_local_mean(fmap, p)
        if agg.shape[-2:] != (h, w):
            agg = F.interpolate(agg, size=(h, w), mode="bilinear", align_corners=False)
        b, c = agg.shape[:2]
        per_position = agg.permute(0, 2, 3, 1).reshape(-1, 1, c)  # (B*H*W, 1, C)
        pooled = F.adaptive_avg_pool1d(per_position, dim)[:, 0] if dim is not None else per_position[:, 0]
        levels.append(pooled.reshape(b, h * w, -1))
    return torch.cat(levels, dim=-1)


@pytest.mark.parametrize("grids, channels, dims, p", [
    ([(8, 8), (4, 4)], [12, 20], [6, 5], 3),
    ([(7, 9), (4, 5)], [10, 16], [4, 7], 3),  # odd grid: not an exact 2x upsampling
    ([(6, 6), (3, 3)], [9, 14], [3, None], 5),  # second level unpooled
    ([(5, 6), (3, 3), (2, 2)], [8, 8, 12], [4, 4, 4], 3),  # three levels
])
def test_patch_embeddings_equals_paper_order(grids, channels, dims, p):
    gen = _gen(len(channels) * 7 + p)
    batch = 2
    maps = [torch.randn(batch, c, h, w, generator=gen) for (h, w), c in zip(grids, channels)]
    pooling = [channel_pooling_matrix(c, d) if d is not None else None for c, d in zip(channels, dims)]
    out = patch_embeddings(maps, pooling, p)
    total = sum(d if d is not None else c for c, d in zip(channels, dims))
    h0, w0 = grids[0]
    assert out.shape == (batch, h0 * w0, total)
    assert out.is_contiguous()
    expected = _paper_order([m.double() for m in maps], dims, p).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_patch_embeddings_rows_follow_the_grid_row_major():
    # Row r*W0 + c of the output is grid position (r, c): check with p=1, one level, no pooling.
    fmap = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    out = patch_embeddings([fmap], [None], 1)
    assert out.shape == (1, 12, 2)
    for r in range(3):
        for c in range(4):
            assert out[0, r * 4 + c].tolist() == fmap[0, :, r, c].tolist()


def test_level_reductions_weigh_every_level_equally():
    from patchcore.core.features import level_reductions

    wide, narrow = level_reductions([1024, 40], 1024)
    torch.testing.assert_close(wide, channel_pooling_matrix(1024, 512))
    assert narrow == pytest.approx((512 / 40) ** 0.5)
    # Scaling by sqrt(e / C) gives the distances of repeating each channel e / C times (here 4 -> 8).
    a, b = torch.randn(2, 4, generator=_gen(5), dtype=torch.float64)
    scale = level_reductions([4, 16], 16)[0]
    torch.testing.assert_close((a - b).norm() * scale, (a.repeat_interleave(2) - b.repeat_interleave(2)).norm())
    assert level_reductions([512, 512], 1024) == [1.0, 1.0]


def test_patch_embeddings_applies_scale_factors():
    maps = [torch.randn(1, 3, 4, 4, generator=_gen(7)), torch.randn(1, 5, 2, 2, generator=_gen(8))]
    plain = patch_embeddings(maps, [None, None], 3)
    scaled = patch_embeddings(maps, [2.0, None], 3)
    torch.testing.assert_close(scaled[..., :3], 2.0 * plain[..., :3])
    torch.testing.assert_close(scaled[..., 3:], plain[..., 3:])
