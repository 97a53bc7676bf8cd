"""Evaluation metrics of the MVTec AD protocol: AUROC, F1-max and AUPRO.

Pure numpy functions of labels and scores; no fitting of any kind, so nothing here can leak the
test split into a result. Every curve is exact: one sort of the scores, then cumulative sums
evaluated at each distinct score (ties are one threshold, as in scikit-learn), so pixel-level
inputs of tens of millions of values cost one ``argsort`` and no Python loop over pixels.
"""
from __future__ import annotations

import numpy as np

__all__ = ["auroc", "f1_max", "aupro", "pixel_metrics", "image_metrics"]


# --------------------------------------------------------------------------------- validation

def _as_binary(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"{name} must be numeric or bool, got dtype {labels.dtype}")
    binary = labels == 1
    if not np.all(binary | (labels == 0)):
        bad = np.unique(labels[~(binary | (labels == 0))])[:5]
        raise ValueError(f"{name} must be binary (0 = good, 1 = defect); "
                         f"found values {bad.tolist()}")
    return binary


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.dtype != bool and (not np.issubdtype(scores.dtype, np.number)
                                 or np.issubdtype(scores.dtype, np.complexfloating)):
        raise ValueError(f"{name} must be real-valued, got dtype {scores.dtype}")
    # NaN has no place in a ranking; sorting would silently put it last.
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return scores


def _check_pair(labels, scores, *, need_negative: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``labels``/``scores`` of any equal shape and return them flattened."""
    labels_arr, scores_arr = np.asarray(labels), np.asarray(scores)
    if labels_arr.shape != scores_arr.shape:
        raise ValueError(f"labels and scores must have the same shape, "
                         f"got {labels_arr.shape} and {scores_arr.shape}")
    if labels_arr.size == 0:
        raise ValueError("labels and scores are empty")
    y = _as_binary(labels_arr, "labels").ravel()
    s = _as_scores(scores_arr, "scores").ravel()
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError("labels contain no positive (defect, 1) sample; the metric is undefined")
    if need_negative and n_pos == y.size:
        raise ValueError("labels contain no negative (good, 0) sample; AUROC is undefined")
    return y, s


# ------------------------------------------------------------------------------- ROC / PR core

def _descending(scores: np.ndarray) -> np.ndarray:
    """Indices that sort ``scores`` (flat) from highest to lowest."""
    # The order inside a group of tied scores is irrelevant: only group ends are read.
    return np.argsort(scores, kind="stable")[::-1]


def _group_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal values in a sorted array."""
    # A threshold t counts every score >= t as positive, so a tie group enters all at once and
    # only the point after its last member lies on the curve (sklearn's _binary_clf_curve).
    return np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))


def _clf_curve(y: np.ndarray, s: np.ndarray, order: np.ndarray | None = None):
    """Counts at each distinct threshold, highest first: (n,) -> fps, tps, thresholds (k,)."""
    if order is None:
        order = _descending(s)
    s_sorted = s[order]
    ends = _group_ends(s_sorted)
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return fps, tps, s_sorted[ends]


def _auroc_from_curve(fps: np.ndarray, tps: np.ndarray) -> float:
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    fps = np.concatenate(([0], fps))
    tps = np.concatenate(([0], tps))
    # Trapezoid rule in integer counts: exact (< 2**63 for any input that fits in memory), and a
    # tie group of positives and negatives contributes half, i.e. the Mann-Whitney U statistic.
    twice_area = int(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])))
    return twice_area / (2 * n_pos * n_neg)


def _f1_from_curve(fps: np.ndarray, tps: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    n_pos = int(tps[-1])
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); a quotient of exact integers, so
    # thresholds with mathematically equal F1 get bit-equal values and the tie-break below is
    # deterministic.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    # sklearn's precision_recall_curve lists thresholds ascending and users take np.argmax, so
    # among equal F1 the lowest threshold wins; thresholds here are descending, hence the last.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(thresholds[best])


def auroc(labels, scores) -> float:
    """Area under the ROC curve; labels (...) in {0, 1} (1 = defect), scores (...) same shape.

    Exact, ties handled as scikit-learn's ``roc_auc_score`` (trapezoid over distinct thresholds).
    Raises ValueError unless both classes are present.
    """
    y, s = _check_pair(labels, scores, need_negative=True)
    fps, tps, _ = _clf_curve(y, s)
    return _auroc_from_curve(fps, tps)


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds ``scores >= t``: (...) , (...) -> (f1, t).

    Same value as the max of F1 from scikit-learn's ``precision_recall_curve``; among thresholds
    with equal F1 the lowest is returned. Needs at least one positive.
    """
    y, s = _check_pair(labels, scores, need_negative=False)
    return _f1_from_curve(*_clf_curve(y, s))


# ------------------------------------------------------------------------------------- AUPRO

def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions of a (N, H, W) bool stack -> labels (N, H, W), count."""
    try:
        from scipy import ndimage  # only AUPRO needs it; importing this module must not
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("aupro needs scipy (scipy.ndimage.label)") from exc
    # 8-connectivity within an image, as the official MVTec AD evaluation code
    # (compute_pro: label(gt_map, np.ones((3, 3)))); no connection between images, so the whole
    # stack is labelled in one call with unique ids.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labelled, n_regions = ndimage.label(masks, structure=structure)
    return labelled, int(n_regions)


def _pro_curve(masks: np.ndarray, maps: np.ndarray, order: np.ndarray | None = None):
    """(FPR, PRO) at each distinct threshold, highest first, starting at (0, 0); (k + 1,) each."""
    labelled, n_regions = _label_regions(masks)
    region = labelled.ravel()
    sizes = np.bincount(region)
    n_neg = int(sizes[0])
    # Each pixel of region r adds 1 / |r| to that region's overlap, so summing these weights over
    # the pixels above t gives sum_r overlap_r(t); dividing by the region count gives PRO(t).
    weight = np.zeros(len(sizes))
    weight[1:] = 1.0 / sizes[1:]
    s = maps.ravel()
    if order is None:
        order = _descending(s)
    region_sorted = region[order]
    ends = _group_ends(s[order])
    fpr = np.cumsum(region_sorted == 0, dtype=np.int64)[ends] / n_neg
    pro = np.cumsum(weight[region_sorted])[ends] / n_regions
    # Rounding in the float cumsum may overshoot 1 by an ulp; the curve ends at exactly (1, 1).
    np.minimum(pro, 1.0, out=pro)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) on [0, limit]; x non-decreasing from 0 to 1 >= limit."""
    # Keep every point with x <= limit (vertical jumps at x == limit included), then close the
    # area with the straight line to the next point evaluated at x == limit.
    i = int(np.searchsorted(x, limit, side="right"))
    area = float(np.sum(np.diff(x[:i]) * (y[1:i] + y[:i - 1])) / 2)
    if x[i - 1] < limit:  # then i < len(x) because x[-1] == 1 >= limit, and x[i] > limit
        y_limit = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
        area += (limit - x[i - 1]) * (y[i - 1] + y_limit) / 2
    return float(area)


def _check_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks_arr, maps_arr = np.asarray(masks), np.asarray(maps)
    if masks_arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks_arr.shape}")
    if masks_arr.shape != maps_arr.shape:
        raise ValueError(f"masks and maps must have the same shape, "
                         f"got {masks_arr.shape} and {maps_arr.shape}")
    if masks_arr.size == 0:
        raise ValueError("masks and maps are empty")
    return _as_binary(masks_arr, "masks"), _as_scores(maps_arr, "maps")


def _aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, order=None) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if masks.all():
        raise ValueError("masks contain no good (0) pixel; the false positive rate is undefined")
    if not masks.any():
        return float("nan")  # no ground-truth region: PRO is a mean over an empty set
    fpr, pro = _pro_curve(masks, maps, order)
    # Normalise by the limit so that a perfect map scores 1.0 (MVTec AD: au_pro /= limit).
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it: in [0, 1].

    masks: (N, H, W) ground truth in {0, 1}; maps: (N, H, W) real anomaly maps. Bergmann et al.,
    MVTec AD (IJCV 2021): PRO(t) = mean over all 8-connected defect regions of all images of the
    fraction of the region with map >= t; FPR(t) = fraction of all good pixels with map >= t.
    The curve starts at (0, 0), is integrated with the trapezoid rule and interpolated at
    exactly FPR = fpr_limit. Images without defects contribute only good pixels. Returns nan
    when there is no defect region at all.
    """
    m, a = _check_maps(masks, maps)
    return _aupro(m, a, fpr_limit)


# ---------------------------------------------------------------------------------- summaries

def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level metrics of (N, H, W) masks and maps: pixel_auroc, pixel_f1_max, aupro."""
    m, a = _check_maps(masks, maps)
    y, s = _check_pair(m, a, need_negative=True)
    # The sort dominates the cost at pixel scale; share it among the three metrics.
    order = _descending(s)
    fps, tps, thresholds = _clf_curve(y, s, order)
    return {
        "pixel_auroc": _auroc_from_curve(fps, tps),
        "pixel_f1_max": _f1_from_curve(fps, tps, thresholds)[0],
        "aupro": _aupro(m, a, fpr_limit, order),
    }


def image_metrics(labels, scores) -> dict[str, float]:
    """Image-level metrics of (N,) labels (0 = good, 1 = defect) and (N,) scores."""
    y, s = _check_pair(labels, scores, need_negative=True)
    fps, tps, thresholds = _clf_curve(y, s)
    f1, threshold = _f1_from_curve(fps, tps, thresholds)
    return {"image_auroc": _auroc_from_curve(fps, tps),
            "image_f1_max": f1,
            "image_f1_threshold": threshold}
