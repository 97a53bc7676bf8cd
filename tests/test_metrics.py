"""Metrics against scikit-learn, a naive AUPRO reference, and hand-computed cases."""
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from patchcore.evaluation.metrics import aupro, auroc, f1_max, image_metrics, pixel_metrics

# ------------------------------------------------------------------------------------- AUROC

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_continuous(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(500) < 0.3
    s = rng.normal(size=500) + 0.8 * y
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(2000) < 0.4).astype(int)
    s = rng.integers(0, 5, size=2000) + y  # 6 distinct values: almost every threshold is a tie
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_float32_pixel_shape_matches_sklearn():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = (rng.random((4, 16, 16)) + masks).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_auroc_perfect_inverted_and_constant():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert auroc(y, s) == 1.0
    assert auroc(y, -s) == 0.0
    assert auroc(y, np.ones(5)) == 0.5  # one tie group: the diagonal


def test_auroc_partial_tie_is_half_credit():
    # positive 0.5 ties with one of two negatives: U = 1 (beats 0.2) + 0.5 (ties 0.5) -> 1.5 / 2
    assert auroc([0, 0, 1], [0.2, 0.5, 0.5]) == 0.75


# ------------------------------------------------------------------------------------ F1-max

def _sklearn_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return np.nanmax(f1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_f1_max_matches_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    y = (rng.random(400) < 0.25).astype(int)
    s = rng.normal(size=400) + y
    if ties:
        s = np.round(s)
    f1, t = f1_max(y, s)
    assert f1 == pytest.approx(_sklearn_f1_max(y, s), abs=1e-12)
    # the returned threshold achieves it, and it is one of the scores
    assert f1_score(y, s >= t) == pytest.approx(f1, abs=1e-12)
    assert t in s


def test_f1_max_hand_computed():
    # thresholds 0.8, 0.4, 0.35, 0.1 give F1 = 2/3, 1/2, 4/5, 2/3
    f1, t = f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8)
    assert t == 0.35


def test_f1_max_tie_returns_lowest_threshold():
    # P = 3. t = 0.9: TP 1, FP 0 -> 2/4; t = 0.5: TP 2, FP 1 -> 4/6; t = 0.3: TP 3, FP 3 -> 6/9.
    # 4/6 == 6/9: the lowest threshold wins, as np.argmax over sklearn's ascending thresholds.
    y, s = [1, 1, 0, 1, 0, 0], [0.9, 0.5, 0.5, 0.3, 0.3, 0.3]
    f1, t = f1_max(y, s)
    assert (f1, t) == (pytest.approx(2 / 3), 0.3)
    p, r, thresholds = precision_recall_curve(y, s)
    assert thresholds[np.argmax(2 * p[:-1] * r[:-1] / (p[:-1] + r[:-1]))] == t


# ------------------------------------------------------------------------------------- AUPRO

def _regions_8(mask):
    """Connected regions of a 2-D bool mask by breadth-first flood fill, 8 neighbours."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                pixels, queue = [], deque([(i, j)])
                seen[i, j] = True
                while queue:
                    a, b = queue.popleft()
                    pixels.append((a, b))
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            u, v = a + da, b + db
                            if 0 <= u < h and 0 <= v < w and mask[u, v] and not seen[u, v]:
                                seen[u, v] = True
                                queue.append((u, v))
                regions.append(pixels)
    return regions


def _reference_aupro(masks, maps, limit=0.3):
    """Naive AUPRO: a full pass per threshold, per-region loops, explicit clipped trapezoid."""
    regions = [(n, px) for n in range(len(masks)) for px in _regions_8(masks[n])]
    negatives = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        hit = maps >= t
        overlaps = [sum(hit[n, a, b] for a, b in px) / len(px) for n, px in regions]
        fpr = (hit & negatives).sum() / negatives.sum()
        points.append((fpr, sum(overlaps) / len(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:  # cut the last segment at the limit
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _three_images():
    """3 images of 12 x 12: regions of 12, 4 and 1 pixels in two images; image 2 is good."""
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 3:7] = True   # 12 pixels
    masks[0, 8:10, 8:10] = True  # 4 pixels
    masks[1, 6, 1] = True        # 1 pixel
    return masks


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_naive_reference(seed, ties, limit):
    masks = _three_images()
    rng = np.random.default_rng(seed)
    maps = rng.random(masks.shape) + 0.6 * masks
    if ties:
        maps = np.round(maps * 8) / 8  # ~13 distinct values: tie groups mix regions and negatives
    expected = _reference_aupro(masks, maps, limit)
    assert 0.0 < expected < 1.0
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_perfect_map_is_one():
    masks = _three_images()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map_is_half_the_limit():
    # One threshold: the curve is the straight line (0, 0) -> (1, 1), so PRO = FPR and
    # int_0^0.3 x dx / 0.3 = 0.045 / 0.3 = 0.15 (= limit / 2).
    masks = _three_images()
    assert aupro(masks, np.full(masks.shape, 3.0)) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, np.zeros(masks.shape), fpr_limit=0.1) == pytest.approx(0.05, abs=1e-12)


def test_aupro_one_of_two_regions_found_is_half():
    # Region A (image 0) scores above every good pixel: PRO jumps to 0.5 at FPR 0. Region B
    # (image 1) scores below 60% of the good pixels, so it only counts after FPR 0.6 > 0.3.
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 1:4, 1:4] = True
    masks[1, 5:7, 5:8] = True
    rng = np.random.default_rng(0)
    maps = rng.permutation(200).reshape(2, 10, 10).astype(float)  # good pixels: distinct ranks
    maps[0][masks[0]] = 1000.0
    maps[1][masks[1]] = np.quantile(maps[~masks], 0.4) - 0.5
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def _block_and_diagonal_pixel(gap):
    """A 2 x 2 block and a single pixel touching its corner diagonally (gap=0) or not (gap=1)."""
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 3 + gap, 3 + gap] = True
    maps = np.linspace(0.0, 1.0, 64).reshape(1, 8, 8)
    maps[0, 3 + gap, 3 + gap] = 2.0   # the single pixel: found before any good pixel
    maps[0, 1:3, 1:3] = -1.0          # the block: found only at the very end (FPR 1)
    return masks, maps


def test_aupro_diagonal_pixels_form_one_region():
    # 8-connectivity: one region of 5 pixels, 1/5 found at FPR 0 -> AUPRO 0.2. With
    # 4-connectivity it would be two regions, one fully found -> 0.5 (the gap=1 control).
    assert aupro(*_block_and_diagonal_pixel(gap=0)) == pytest.approx(0.2, abs=1e-12)
    assert aupro(*_block_and_diagonal_pixel(gap=1)) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_do_not_connect_across_images():
    # The same pixels in consecutive images are separate regions: 0.5, not 1/5 of a merged one.
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 2, 2] = True
    maps = np.linspace(0.0, 1.0, 72).reshape(2, 6, 6)
    maps[1, 2, 2] = 2.0
    maps[0, 2:4, 2:4] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_without_regions_is_nan():
    assert np.isnan(aupro(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4))))


# --------------------------------------------------------------------------------- summaries

def test_pixel_metrics_agree_with_the_single_metrics():
    masks = _three_images()
    maps = np.random.default_rng(5).random(masks.shape) + 0.5 * masks
    got = pixel_metrics(masks, maps)
    assert set(got) == {"pixel_auroc", "pixel_f1_max", "aupro"}
    assert all(type(v) is float for v in got.values())  # plain floats: JSON-serialisable
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert got["pixel_auroc"] == pytest.approx(expected, abs=1e-12)
    assert got["pixel_f1_max"] == pytest.approx(f1_max(masks, maps)[0], abs=1e-12)
    assert got["aupro"] == pytest.approx(_reference_aupro(masks, maps), abs=1e-6)


def test_image_metrics_agree_with_the_single_metrics():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.3, 0.4, 0.9, 0.8, 0.2])
    got = image_metrics(labels, scores)
    assert got == {"image_auroc": pytest.approx(roc_auc_score(labels, scores)),
                   "image_f1_max": pytest.approx(_sklearn_f1_max(labels, scores)),
                   "image_f1_threshold": f1_max(labels, scores)[1]}
    assert all(type(v) is float for v in got.values())


# -------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("fn", [auroc, f1_max, image_metrics])
@pytest.mark.parametrize("labels, scores, message", [
    ([0, 1, 1], [0.1, 0.2], "same shape"),
    ([0, 2, 1], [0.1, 0.2, 0.3], "binary"),
    ([0, 0, 0], [0.1, 0.2, 0.3], "no positive"),
    ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
    ([0, 1, 1], ["a", "b", "c"], "real-valued"),
    ([], [], "empty"),
])
def test_invalid_inputs_raise(fn, labels, scores, message):
    with pytest.raises(ValueError, match=message):
        fn(labels, scores)


def test_auroc_needs_a_negative_but_f1_does_not():
    with pytest.raises(ValueError, match="no negative"):
        auroc([1, 1], [0.2, 0.3])
    assert f1_max([1, 1], [0.2, 0.3]) == (1.0, 0.2)


def test_aupro_invalid_inputs_raise():
    masks = _three_images()
    maps = np.zeros(masks.shape)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(masks[0], maps[0])
    with pytest.raises(ValueError, match="same shape"):
        aupro(masks, maps[:2])
    with pytest.raises(ValueError, match="binary"):
        aupro(masks * 3, maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=1.5)
    with pytest.raises(ValueError, match="no good"):
        aupro(np.ones((1, 3, 3), bool), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="no positive"):
        pixel_metrics(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 3)))
