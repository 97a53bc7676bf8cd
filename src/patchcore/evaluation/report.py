"""report.html of `patchcore evaluate`: one self-contained page that people open to see how a model did.

Self-contained: every picture is a base64 PNG data URI, the CSS is inline, there is no script, no font and
no external reference of any kind, so the file can be mailed or opened offline. All text is escaped.

Per category the page holds: the headline metrics, the resolution at which pixel metrics were computed,
the notes, the image-level ROC and precision-recall curves (computed here, exactly, from the image scores),
the pixel-level ROC and PR curves (from `pixel_curves`, computed by the caller, may be subsampled), the
histograms of good and defect image scores with the calibrated threshold as a vertical line, a table of
metrics per defect type, a gallery of the worst false alarms and the missed defects (their overlays and
titles), and the settings.

Interface
---------
``GalleryItem(title, kind, overlay_png)``: kind is "false alarm" or "missed defect"; overlay_png the bytes
of a PNG drawn by the caller.

``CategoryReport(name, image_scores, image_labels, defect_types, threshold, metrics, per_type,
pixel_curves, gallery, resolution, settings, notes=[])``: see the class.

``write_report(path, categories, *, title="PatchCore evaluation")``: render and write atomically (temporary
file in the same folder, then os.replace). Raises ReportUnavailableError (a PatchCoreError) naming
``pip install 'patchcore[report]'`` when matplotlib is missing, before anything is written.

``check_available()``: raises that same error at once, for callers that want to fail (or warn) before a long run.

``select_gallery(scores, labels, threshold, k=6) -> (false_alarms, missed)``: indices; false_alarms are the
good images with the highest scores (highest first, so those above the threshold come first), missed the
defect images with the lowest scores (lowest first, so those at or below the threshold come first). Ties
keep index order. ``threshold`` does not change the order; it is accepted so that callers state it.

``category_report(name, scores, labels, defect_types, *, threshold, metrics, resolution, settings, maps=None,
masks=None, per_type=None, pixel_curves=None, pixel_threshold=None, pictures=None, files=None, notes=(), k=6,
aupro_fpr_limit=0.3, max_curve_points=2000, per_type_pixels=True) -> CategoryReport``: builds everything
from what `evaluate_category` has: takes precomputed per-type rows and pixel curves as given, or computes
them from the (N, H, W) maps and masks (an array or {index: mask}); draws the gallery overlays as
`patchcore predict` draws them (render.colormap / normalise_map / overlay), the ground truth outlined in
magenta.

Also public: ``roc_curve``, ``pr_curve``, ``roc_and_pr_curves`` (exact, counted as metrics.auroc / f1_max
count: ties are one threshold), ``average_precision``, ``subsample_curve``, ``gallery_overlay``,
``render_report`` (the page as a string).

matplotlib is imported only when a report is drawn, and only its object-oriented API with the Agg canvas
(`matplotlib.figure.Figure` + `FigureCanvasAgg`): pyplot is never imported, so no global backend or figure
state is touched, and drawing is safe in threads and on machines without a display.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import OutputError, PatchCoreError
from ..io.render import colormap, normalise_map, overlay
from .metrics import _check_pair, _clf_curve, auroc, pixel_metrics

__all__ = ["GALLERY_KINDS", "CategoryReport", "GalleryItem", "ReportUnavailableError", "category_report",
           "check_available", "pr_curve", "render_report", "roc_and_pr_curves", "roc_curve", "select_gallery",
           "write_report"]

GALLERY_KINDS = ("false alarm", "missed defect")
PERCENT_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
                 "image_f1_max": "image F1-max", "pixel_f1_max": "pixel F1-max", "n": "images",
                 "false_alarms": "false alarms at threshold", "missed": "missed at threshold"}
COUNT_KEYS = ("n", "false_alarms", "missed")
INSTALL_HINT = "pip install 'patchcore[report]'"


class ReportUnavailableError(PatchCoreError, RuntimeError):
    """report.html cannot be drawn here: matplotlib is not installed."""


@dataclass
class GalleryItem:
    title: str  # e.g. "good/003.png: score 2.31 > threshold 1.90"
    kind: str  # "false alarm" | "missed defect"
    overlay_png: bytes  # a PNG of the image with its heatmap overlay, rendered by the caller


@dataclass
class CategoryReport:
    name: str
    image_scores: np.ndarray  # (N,) float
    image_labels: np.ndarray  # (N,) 0 good / 1 defect
    defect_types: list[str]  # (N,) "good" or the defect type of each image
    threshold: float | None  # the model's calibrated image threshold (defect when score > threshold)
    metrics: dict[str, float | None]  # image_auroc, pixel_auroc, aupro, image_f1_max, pixel_f1_max
    per_type: dict[str, dict[str, float | None]]  # defect type -> {"n", "image_auroc", "pixel_auroc", ...}
    pixel_curves: dict | None  # {"roc": (fpr, tpr), "pr": (recall, precision)}; None without masks
    gallery: list[GalleryItem]
    resolution: str  # at which resolution pixel metrics were computed
    settings: dict  # the config dict
    notes: list[str] = field(default_factory=list)  # e.g. evaluate's notes on the crop and hidden defects


# ------------------------------------------------------------------------------------ curves
def _curves(labels, scores, *, need_negative: bool):
    """fps, tps and thresholds from one sort (metrics' own counting), each led by the point at threshold inf."""
    y, s = _check_pair(labels, scores, need_negative=need_negative)
    fps, tps, thresholds = _clf_curve(y, s)
    return np.concatenate(([0], fps)), np.concatenate(([0], tps)), np.concatenate(([np.inf], thresholds))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at each distinct score, highest first, starting at (0, 0) with threshold inf.

    Same counting as metrics.auroc (ties are one threshold), so the trapezoid area of this curve is the
    AUROC that metrics reports. Needs both classes."""
    fps, tps, thresholds = _curves(labels, scores, need_negative=True)
    return fps / fps[-1], tps / tps[-1], thresholds


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, thresholds) at each distinct score, highest first, starting at (0, 1) as
    scikit-learn's precision_recall_curve (whose order is the reverse). Needs a positive."""
    fps, tps, thresholds = _curves(labels, scores, need_negative=False)
    return tps / tps[-1], np.concatenate(([1.0], tps[1:] / (tps[1:] + fps[1:]))), thresholds


def roc_and_pr_curves(labels, scores):
    """(roc_curve(...), pr_curve(...)) from one sort of the scores: for pixel-scale inputs."""
    fps, tps, thresholds = _curves(labels, scores, need_negative=True)
    recall = tps / tps[-1]
    precision = np.concatenate(([1.0], tps[1:] / (tps[1:] + fps[1:])))
    return (fps / fps[-1], recall, thresholds), (recall, precision, thresholds)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Step-wise area of a PR curve from pr_curve (scikit-learn's average_precision_score)."""
    return float(np.sum(np.diff(recall) * precision[1:]))


def subsample_curve(x: np.ndarray, y: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~max_points points of a curve, evenly spaced along its length (corners kept), ends kept."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) <= max_points:
        return x, y
    length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))))
    marks = np.linspace(0.0, length[-1], max_points)
    keep = np.unique(np.concatenate(([0, len(x) - 1], np.searchsorted(length, marks).clip(0, len(x) - 1))))
    return x[keep], y[keep]


# ----------------------------------------------------------------------------------- gallery
def select_gallery(scores, labels, threshold: float | None, k: int = 6) -> tuple[list[int], list[int]]:
    """(false alarms, missed defects): indices of the k good images with the highest scores, highest first,
    and of the k defect images with the lowest scores, lowest first; ties in index order.

    Highest first puts the good images above `threshold` (the false alarms proper) first and fills the
    rest with those closest to it; likewise for defects at or below it. With threshold None the order is
    the same: the most suspicious good images and the least suspicious defects."""
    del threshold  # the order does not depend on it; titles say which side of it each image lies
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape} and {y.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    good, defect = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    worst_good = good[np.argsort(-s[good], kind="stable")][:k]
    worst_defect = defect[np.argsort(s[defect], kind="stable")][:k]
    return [int(i) for i in worst_good], [int(i) for i in worst_defect]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a bool (H, W) mask with a 4-neighbour outside it (or on the border)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def gallery_overlay(picture: np.ndarray | None, anomaly_map: np.ndarray | None, *,
                    pixel_threshold: float | None = None, value_range: tuple[float, float] | None = None,
                    truth: np.ndarray | None = None, max_side: int = 320) -> bytes:
    """PNG of one gallery image: heat over the picture as `patchcore predict` draws it (predicted pixels
    outlined in white when there is a pixel threshold), the ground truth outlined in magenta."""
    if anomaly_map is None and picture is None:
        raise ValueError("a gallery overlay needs a picture or an anomaly map")
    if anomaly_map is not None:
        heat = colormap(normalise_map(anomaly_map, pixel_threshold, value_range))
        predicted = None if pixel_threshold is None else anomaly_map > pixel_threshold
        if picture is not None:
            if picture.shape[:2] != anomaly_map.shape:
                raise ValueError(f"picture {picture.shape[:2]} and anomaly map {anomaly_map.shape} differ in size")
            out = overlay(picture, heat, predicted)
        else:
            out = heat
    else:
        out = np.ascontiguousarray(picture, dtype=np.uint8)
    out = out.copy()
    if truth is not None and truth.any():
        out[_outline(truth)] = (255, 0, 255)
    image = Image.fromarray(out)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "none" if value is None else f"{value:.{digits}g}"


# ------------------------------------------------------------------------ building a report
def category_report(name: str, scores, labels, defect_types: Sequence[str], *, threshold: float | None,
                    metrics: dict[str, float | None], resolution: str, settings: dict,
                    maps: np.ndarray | None = None, masks: np.ndarray | Mapping[int, np.ndarray] | None = None,
                    per_type: Mapping[str, Mapping[str, float | None]] | None = None,
                    pixel_curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                    pixel_threshold: float | None = None,
                    pictures: Callable[[int], np.ndarray] | None = None,
                    files: Sequence[str] | None = None, notes: Sequence[str] = (), k: int = 6,
                    aupro_fpr_limit: float = 0.3, max_curve_points: int = 2000,
                    per_type_pixels: bool = True) -> CategoryReport:
    """A CategoryReport from what evaluate_category has.

    scores (N,), labels (N,) 0/1, defect_types (N,); maps (N, H, W) anomaly maps at model geometry, or a list
    of N (h_i, w_i) maps for images of different sizes; masks the ground truth at the same geometry, either a
    bool (N, H, W) array or {test index: bool mask the size of its map} for the images that have one (the
    others: empty); None without masks.
    per_type: precomputed rows per defect type ({"n", "image_auroc", "pixel_auroc", "aupro", ...}), used
    as given; without it they are computed here: n and image AUROC against all good images, and with
    masks and per_type_pixels also pixel AUROC and AUPRO on the good and that type's images (one sort of
    their pixels per type: the dominant cost at MVTec scale, seconds per category). Either way a "good"
    row is added and, with a threshold, false_alarms (good rows) and missed (defect rows) counts.
    pixel_curves: precomputed {"roc": (fpr, tpr), "pr": (recall, precision)} (e.g. at the original
    resolution), used as given (subsampled to max_curve_points); without it they are computed here from
    maps and masks (one sort of all pixels), or None without masks.
    pictures(i) -> (H, W, 3) uint8, the i-th test image at model geometry (model.preprocess.geometry),
    called only for the gallery images; files: display names for the titles (default "#i")."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    types = list(defect_types)
    n = len(scores)
    if not (n == len(labels) == len(types)):
        raise ValueError(f"scores, labels and defect_types differ in length: {n}, {len(labels)}, {len(types)}")
    if maps is not None and len(maps) != n:
        raise ValueError(f"maps hold {len(maps)} images, scores {n}")
    if masks is not None and maps is None:
        raise ValueError("masks need the maps they are compared with")
    map_shapes = None if maps is None else [np.shape(m) for m in maps]  # (h_i, w_i): sizes may differ
    if isinstance(masks, Mapping):
        by_index = {int(i): np.asarray(m, dtype=bool) for i, m in masks.items()}
        wrong = [i for i, m in by_index.items() if not 0 <= i < n or m.shape != map_shapes[i]]
        if wrong:
            i = wrong[0]
            raise ValueError(f"masks must map test indices to masks of their map's size: index {i} has "
                             f"{by_index[i].shape if i in by_index else None}, "
                             f"its map {map_shapes[i] if 0 <= i < n else None}")

        def gt_array() -> np.ndarray:
            if len(set(map_shapes)) > 1:
                raise ValueError("maps of different sizes: pass pixel_curves and per_type (evaluate computes "
                                 "them at each image's size)")
            stack = np.zeros((n, *map_shapes[0]), dtype=bool)
            for i, m in by_index.items():
                stack[i] = m
            return stack

        def truth(i: int) -> np.ndarray | None:
            return by_index.get(i)
    elif masks is not None:
        if np.shape(masks) != np.shape(maps):
            raise ValueError(f"masks {np.shape(masks)} and maps {np.shape(maps)} differ in shape")
        stack = np.asarray(masks, dtype=bool)

        def gt_array() -> np.ndarray:
            return stack

        def truth(i: int) -> np.ndarray | None:
            return stack[i]
    else:
        def truth(i: int) -> np.ndarray | None:
            return None
    names = list(files) if files is not None else [f"#{i}" for i in range(n)]
    types_arr = np.array(types, dtype=object)
    gt = gt_array() if masks is not None and (pixel_curves is None or (per_type is None and per_type_pixels)) \
        else None

    if pixel_curves is not None:
        curves = {key: subsample_curve(*pixel_curves[key], max_points=max_curve_points) for key in ("roc", "pr")}
    elif gt is not None and gt.any() and not gt.all():  # one sort of all pixels for both curves
        (fpr, tpr, _), (recall, precision, _) = roc_and_pr_curves(gt, maps)
        curves = {"roc": subsample_curve(fpr, tpr, max_curve_points),
                  "pr": subsample_curve(recall, precision, max_curve_points)}
    else:
        curves = None

    good = labels == 0
    rows: dict[str, dict[str, float | None]] = {}
    if good.any():
        rows["good"] = {"n": int(good.sum())}
        if threshold is not None:
            rows["good"]["false_alarms"] = int(np.sum(scores[good] > threshold))
    defects = sorted({t for t, y in zip(types, labels) if y == 1} | set(per_type or ()) - {"good"})
    for defect in defects:
        of_type = (types_arr == defect) & (labels == 1)
        if per_type is not None:
            row = dict(per_type.get(defect, {"n": int(of_type.sum())}))
        else:
            subset = good | of_type
            row = {"n": int(of_type.sum()),
                   "image_auroc": auroc(labels[subset], scores[subset]) if good.any() and of_type.any() else None}
            if gt is not None and per_type_pixels:
                sub_masks = gt[subset]
                if sub_masks.any() and not sub_masks.all():
                    pixel = pixel_metrics(sub_masks, np.asarray(maps)[subset], fpr_limit=aupro_fpr_limit)
                    row["pixel_auroc"], row["aupro"] = pixel["pixel_auroc"], pixel["aupro"]
                else:
                    row["pixel_auroc"] = row["aupro"] = None
        if threshold is not None:
            row["missed"] = int(np.sum(scores[of_type] <= threshold))
        rows[defect] = row

    gallery = []
    false_alarms, missed = select_gallery(scores, labels, threshold, k)
    value_range = None if maps is None else (min(float(np.nanmin(m)) for m in maps),
                                             max(float(np.nanmax(m)) for m in maps))
    for kind, indices in zip(GALLERY_KINDS, (false_alarms, missed)):
        for i in indices:
            if threshold is None:
                verdict = f"score {scores[i]:.4g} (no threshold)"
            elif scores[i] > threshold:
                verdict = f"score {scores[i]:.4g} > threshold {threshold:.4g}: " + (
                    "false alarm" if labels[i] == 0 else "detected")
            else:
                verdict = f"score {scores[i]:.4g} <= threshold {threshold:.4g}: " + (
                    "passed" if labels[i] == 0 else "missed")
            picture = pictures(i) if pictures is not None else None
            if picture is None and maps is None:
                continue
            png = gallery_overlay(picture, None if maps is None else np.asarray(maps[i], dtype=np.float32),
                                  pixel_threshold=pixel_threshold, value_range=value_range,
                                  truth=truth(i))
            gallery.append(GalleryItem(f"{names[i]} ({types[i]}): {verdict}", kind, png))

    return CategoryReport(name=name, image_scores=scores, image_labels=labels, defect_types=types,
                          threshold=threshold, metrics=dict(metrics), per_type=rows, pixel_curves=curves,
                          gallery=gallery, resolution=resolution, settings=dict(settings), notes=list(notes))


# ---------------------------------------------------------------------------------- drawing
def _matplotlib():
    """Figure and the Agg canvas class, imported on first use; a clear error without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportUnavailableError(f"report.html needs matplotlib, which is not installed: {INSTALL_HINT}") \
            from exc
    return Figure, FigureCanvasAgg


def check_available() -> None:
    """Raise ReportUnavailableError now if report.html could not be drawn (to fail or warn before a long run)."""
    _matplotlib()


class _Drawer:
    def __init__(self):
        self.Figure, self.Canvas = _matplotlib()

    def figure(self):
        fig = self.Figure(figsize=(4.2, 3.4), dpi=100, layout="constrained")
        self.Canvas(fig)
        return fig, fig.add_subplot()

    @staticmethod
    def png(fig) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        return buffer.getvalue()

    def roc(self, fpr, tpr, title: str, point: tuple[float, float] | None = None) -> bytes:
        fig, ax = self.figure()
        ax.plot([0, 1], [0, 1], color="0.75", lw=1, ls=":")
        ax.plot(fpr, tpr, color="tab:blue", lw=1.8, drawstyle="default")
        if point is not None:
            ax.plot(*point, "o", color="tab:red", ms=6, label="calibrated threshold")
            ax.legend(loc="lower right", fontsize=8)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=title)
        ax.grid(alpha=0.3)
        return self.png(fig)

    def pr(self, recall, precision, title: str, base_rate: float | None,
           point: tuple[float, float] | None = None) -> bytes:
        fig, ax = self.figure()
        if base_rate is not None:
            ax.axhline(base_rate, color="0.75", lw=1, ls=":")
        ax.plot(recall, precision, color="tab:green", lw=1.8, drawstyle="steps-post" if len(recall) < 200 else None)
        if point is not None:
            ax.plot(*point, "o", color="tab:red", ms=6, label="calibrated threshold")
            ax.legend(loc="lower left", fontsize=8)
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall", ylabel="precision", title=title)
        ax.grid(alpha=0.3)
        return self.png(fig)

    def histogram(self, good: np.ndarray, defect: np.ndarray, threshold: float | None, title: str) -> bytes:
        fig, ax = self.figure()
        both = np.concatenate([good, defect])
        edges = np.histogram_bin_edges(both, bins=int(np.clip(2 * math.sqrt(len(both)), 5, 40)))
        if len(good):
            ax.hist(good, bins=edges, color="tab:blue", alpha=0.55, label=f"good ({len(good)})")
        if len(defect):
            ax.hist(defect, bins=edges, color="tab:orange", alpha=0.55, label=f"defect ({len(defect)})")
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", lw=1.6, ls="--", label=f"threshold {threshold:.4g}")
        ax.set(xlabel="image score", ylabel="images", title=title)
        ax.yaxis.get_major_locator().set_params(integer=True)  # counts of images
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return self.png(fig)


# ------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1400px;padding:1em 2em;color:#1b1b1b;background:#fff;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.figures,.gallery{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;max-width:440px}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#444}
.gallery figure{max-width:330px}.gallery img{width:320px;image-rendering:pixelated}
.note{color:#8a4b00}.muted{color:#666}code{font-size:.9em}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(png: bytes, alt: str, caption: str, *, figure_id: str, category: str) -> str:
    return (f'<figure data-figure="{_e(figure_id)}" data-category="{_e(category)}">'
            f'<img src="{_data_uri(png)}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>')


def _value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key in PERCENT_KEYS:
        return f"{100 * float(value):.1f}"
    if isinstance(value, (int, np.integer)) or key in COUNT_KEYS:
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _slug(index: int, name: str) -> str:
    return f"cat-{index}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")


def _check_category(report: CategoryReport) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(report.image_scores, dtype=np.float64).ravel()
    labels = np.asarray(report.image_labels).ravel()
    if scores.shape != labels.shape or len(report.defect_types) != len(scores):
        raise ValueError(f"{report.name}: image_scores ({scores.size}), image_labels ({labels.size}) and "
                         f"defect_types ({len(report.defect_types)}) must have the same length")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{report.name}: image_scores contain NaN or infinite values")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError(f"{report.name}: image_labels must be 0 (good) or 1 (defect)")
    for item in report.gallery:
        if item.kind not in GALLERY_KINDS:
            raise ValueError(f"{report.name}: gallery kind must be one of {GALLERY_KINDS}, got {item.kind!r}")
        if not item.overlay_png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"{report.name}: gallery item {item.title!r} is not a PNG")
    return scores, labels.astype(np.int64)


def _section(index: int, report: CategoryReport, draw: _Drawer) -> str:
    scores, labels = _check_category(report)
    name, threshold = report.name, report.threshold
    good, defect = scores[labels == 0], scores[labels == 1]
    out = [f'<section id="{_slug(index, name)}" data-category="{_e(name)}"><h2>{_e(name)}</h2>']

    # headline metrics, resolution, threshold, notes
    out.append('<table class="metrics"><tr>' + "".join(f"<th>{_e(METRIC_LABELS[m])}</th>" for m in PERCENT_KEYS)
               + "</tr><tr>" + "".join(f'<td class="num">{_percent(report.metrics.get(m))}</td>'
                                       for m in PERCENT_KEYS) + "</tr></table>")
    out.append(f'<p class="resolution">Resolution: {_e(report.resolution)}.</p>')
    if threshold is None:
        out.append('<p class="threshold">No calibrated image threshold (fewer than 10 training images or '
                   'calibration_ratio 0): no image decisions.</p>')
    else:
        out.append(f'<p class="threshold">Calibrated image threshold {_e(_fmt(threshold))} (set on held-out '
                   f'training images; defect when score &gt; threshold): {int(np.sum(good > threshold))} of '
                   f'{len(good)} good images flagged (false alarms), {int(np.sum(defect <= threshold))} of '
                   f'{len(defect)} defect images missed.</p>')
    out += [f'<p class="note">Note: {_e(note)}</p>' for note in report.notes]

    # image curves and histogram
    out.append('<h3>Image level</h3><div class="figures">')
    if len(good) and len(defect):
        (fpr, tpr, _), (recall, precision, _) = roc_and_pr_curves(labels, scores)
        area = auroc(labels, scores)
        ap = average_precision(recall, precision)
        roc_point = pr_point = None
        roc_where = pr_where = ""
        if threshold is not None:
            tp, fp = int(np.sum(defect > threshold)), int(np.sum(good > threshold))
            roc_point = (fp / len(good), tp / len(defect))
            roc_where = (f"; red dot: the calibrated threshold {_fmt(threshold)} (FPR {roc_point[0]:.3f}, "
                         f"TPR {roc_point[1]:.3f})")
            if tp + fp:
                pr_point = (tp / len(defect), tp / (tp + fp))
                pr_where = (f"; red dot: the calibrated threshold {_fmt(threshold)} (recall {pr_point[0]:.3f}, "
                            f"precision {pr_point[1]:.3f})")
            else:
                pr_where = f"; the calibrated threshold {_fmt(threshold)} flags no image (precision undefined)"
        out.append(_figure(draw.roc(fpr, tpr, f"{name}: image ROC", roc_point), f"{name} image-level ROC curve",
                           f"Image-level ROC of {len(good)} good and {len(defect)} defect images: AUROC "
                           f"{_percent(area)}{roc_where}.", figure_id="image-roc", category=name))
        f1 = report.metrics.get("image_f1_max")
        out.append(_figure(draw.pr(recall, precision, f"{name}: image precision-recall",
                                   len(defect) / len(scores), pr_point),
                           f"{name} image-level precision-recall curve",
                           f"Image-level precision-recall: average precision {_percent(ap)}, F1-max "
                           f"{_percent(f1)}; dotted: the share of defect images "
                           f"({len(defect) / len(scores):.2f}){pr_where}.", figure_id="image-pr", category=name))
    else:
        out.append('<p class="muted">No image ROC or precision-recall curve: the test set needs good and defect '
                   'images.</p>')
    if threshold is None:
        hist_caption = "Image scores of good and defect images; no calibrated threshold to draw."
    else:
        hist_caption = (f"Image scores of good and defect images; dashed line: the calibrated threshold "
                        f"{_fmt(threshold)}.")
    out.append(_figure(draw.histogram(good, defect, threshold, f"{name}: image scores"),
                       f"{name} image score histogram", hist_caption, figure_id="score-histogram", category=name))
    out.append("</div>")

    # pixel curves
    out.append('<h3>Pixel level</h3>')
    if report.pixel_curves is None:
        out.append('<p class="muted no-pixel-curves">No pixel-level curves: no ground-truth masks (or no defect '
                   'pixel) for this category.</p>')
    else:
        fpr, tpr = (np.asarray(a, dtype=np.float64) for a in report.pixel_curves["roc"])
        recall, precision = (np.asarray(a, dtype=np.float64) for a in report.pixel_curves["pr"])
        for x, y, what in ((fpr, tpr, "roc"), (recall, precision, "pr")):
            if x.shape != y.shape or x.ndim != 1 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                raise ValueError(f"{name}: pixel_curves[{what!r}] must be two finite 1-d arrays of equal length")
        out.append('<div class="figures">')
        out.append(_figure(draw.roc(fpr, tpr, f"{name}: pixel ROC"), f"{name} pixel-level ROC curve",
                           f"Pixel-level ROC over all test pixels: pixel AUROC "
                           f"{_percent(report.metrics.get('pixel_auroc'))}, AUPRO "
                           f"{_percent(report.metrics.get('aupro'))}.", figure_id="pixel-roc", category=name))
        out.append(_figure(draw.pr(recall, precision, f"{name}: pixel precision-recall", None),
                           f"{name} pixel-level precision-recall curve",
                           f"Pixel-level precision-recall over all test pixels: pixel F1-max "
                           f"{_percent(report.metrics.get('pixel_f1_max'))}.", figure_id="pixel-pr", category=name))
        out.append("</div>")

    # per defect type
    out.append("<h3>Per defect type</h3>")
    if report.per_type:
        columns = list(dict.fromkeys(key for row in report.per_type.values() for key in row))
        order = ["n", "image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "false_alarms", "missed"]
        columns = [c for c in order if c in columns] + [c for c in columns if c not in order]
        out.append('<table class="per-type"><tr><th>defect type</th>'
                   + "".join(f"<th>{_e(METRIC_LABELS.get(c, c))}</th>" for c in columns) + "</tr>")
        for kind, row in report.per_type.items():
            out.append(f'<tr data-type="{_e(kind)}"><td>{_e(kind)}</td>'
                       + "".join(f'<td class="num">{_e(_value(c, row.get(c)))}</td>' for c in columns) + "</tr>")
        out.append("</table><p class=\"muted\">Metrics in %; image and pixel metrics of a defect type are computed "
                   "on its images together with all good images.</p>")
    else:
        out.append('<p class="muted">No per-type metrics.</p>')

    # gallery
    headings = {
        "false alarm": ("Worst false alarms", "good images with the highest scores (above the threshold first)"),
        "missed defect": ("Missed defects", "defect images with the lowest scores (at or below the threshold first)"),
    }
    for kind in GALLERY_KINDS:
        items = [item for item in report.gallery if item.kind == kind]
        heading, what = headings[kind]
        out.append(f'<h3>{_e(heading)}</h3><p class="muted">{_e(what)}; heat over the image at model geometry, '
                   f'white outline: predicted defect pixels, magenta: ground truth.</p>')
        if not items:
            out.append('<p class="muted">None.</p>')
            continue
        out.append(f'<div class="gallery" data-kind="{_e(kind)}">')
        for item in items:
            out.append(f'<figure data-gallery="{_e(kind)}" data-category="{_e(name)}">'
                       f'<img src="{_data_uri(item.overlay_png)}" alt="{_e(item.title)}">'
                       f'<figcaption>{_e(item.title)}</figcaption></figure>')
        out.append("</div>")

    # settings
    out.append('<details><summary>Settings</summary><table class="settings">')
    for key, value in report.settings.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        out.append(f"<tr><th>{_e(key)}</th><td><code>{_e(shown)}</code></td></tr>")
    out.append("</table></details></section>")
    return "\n".join(out)


def render_report(categories: Sequence[CategoryReport], *, title: str = "PatchCore evaluation") -> str:
    """The whole page as a string (write_report writes it)."""
    draw = _Drawer()  # fails here, before any output, without matplotlib
    sections = [_section(i, report, draw) for i, report in enumerate(categories)]
    head = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if categories:
        head.append('<table class="summary"><tr><th>category</th>'
                    + "".join(f"<th>{_e(METRIC_LABELS[m])}</th>" for m in PERCENT_KEYS) + "<th>threshold</th></tr>")
        for i, report in enumerate(categories):
            head.append(f'<tr><td><a href="#{_slug(i, report.name)}">{_e(report.name)}</a></td>'
                        + "".join(f'<td class="num">{_percent(report.metrics.get(m))}</td>' for m in PERCENT_KEYS)
                        + f'<td class="num">{_e(_fmt(report.threshold))}</td></tr>')
        head.append("</table>")
    else:
        head.append('<p class="muted">No category evaluated yet.</p>')
    return "\n".join(head + sections + ["</body></html>", ""])


def write_report(path: str | Path, categories: Sequence[CategoryReport], *,
                 title: str = "PatchCore evaluation") -> None:
    """Render the report and write it to `path` atomically (temporary file in the same folder, os.replace)."""
    path = Path(path)
    text = render_report(categories, title=title)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, expected a report file path")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique: concurrent writers never collide
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the report ({err.strerror or err})") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
