"""report.html: self-contained, and it holds what it claims (figures per level, threshold, per-type rows,
gallery overlays byte for byte), with and without masks or a threshold; select_gallery; category_report."""
from __future__ import annotations

import base64
import io
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from patchcore.errors import PatchCoreError
from patchcore.evaluation.metrics import auroc, f1_max, pixel_metrics
from patchcore.evaluation.report import (
    CategoryReport,
    GalleryItem,
    ReportUnavailableError,
    average_precision,
    category_report,
    check_available,
    pr_curve,
    roc_and_pr_curves,
    roc_curve,
    select_gallery,
    subsample_curve,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Every tag with its attributes, the text of each figcaption and table row, in document order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.figures: list[dict] = []  # {"attrs", "img", "caption"}
        self.rows: list[dict] = []  # {"attrs", "cells"}
        self.text: list[str] = []
        self._figure = self._row = None
        self._in_caption = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attrs))
        if tag == "figure":
            self._figure = {"attrs": attrs, "img": None, "caption": ""}
        elif tag == "img" and self._figure is not None:
            self._figure["img"] = attrs
        elif tag == "figcaption":
            self._in_caption = True
        elif tag == "tr":
            self._row = {"attrs": attrs, "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._row["cells"].append("")
            self._in_cell = True

    def handle_endtag(self, tag):
        if tag == "figure" and self._figure is not None:
            self.figures.append(self._figure)
            self._figure = None
        elif tag == "figcaption":
            self._in_caption = False
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_caption and self._figure is not None:
            self._figure["caption"] += data
        if self._in_cell and self._row is not None:
            self._row["cells"][-1] += data


def parse(path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    return text, page


def png_bytes(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


def tiny_png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def figures_of(page: Page, category: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for figure in page.figures:
        if figure["attrs"].get("data-category") == category and "data-figure" in figure["attrs"]:
            out.setdefault(figure["attrs"]["data-figure"], []).append(figure)
    return out


def assert_self_contained(text: str, page: Page) -> None:
    lowered = text.lower()
    assert 'src="http' not in lowered and "src='http" not in lowered
    assert "<link" not in lowered and "<script" not in lowered and "@import" not in lowered
    assert "url(" not in lowered
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            if value is None:
                continue
            assert value.startswith("data:image/png;base64,") or value.startswith("#"), (tag, name, value[:60])


# ------------------------------------------------------------------------------ a category
SCORES = np.array([1.0, 1.5, 2.5, 1.2, 3.0, 1.8, 2.2, 4.0])
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
TYPES = ["good", "good", "good", "good", "crack", "crack", "scratch<b>", "scratch<b>"]


def make_category(name="bottle & co", *, threshold=2.0, pixels=True) -> CategoryReport:
    overlays = [GalleryItem("good/002.png: score 2.5 > threshold 2", "false alarm", tiny_png((255, 0, 0))),
                GalleryItem("crack/001.png: score 1.8 <= threshold 2", "missed defect", tiny_png((0, 0, 255)))]
    curves = None
    if pixels:
        rng = np.random.default_rng(0)
        truth = rng.random(500) < 0.2
        values = rng.random(500) + truth
        fpr, tpr, _ = roc_curve(truth, values)
        recall, precision, _ = pr_curve(truth, values)
        curves = {"roc": (fpr, tpr), "pr": (recall, precision)}
    return CategoryReport(
        name=name, image_scores=SCORES, image_labels=LABELS, defect_types=TYPES, threshold=threshold,
        metrics={"image_auroc": auroc(LABELS, SCORES), "pixel_auroc": 0.9 if pixels else None,
                 "aupro": 0.8 if pixels else None, "image_f1_max": f1_max(LABELS, SCORES)[0],
                 "pixel_f1_max": 0.5 if pixels else None},
        per_type={"good": {"n": 4, "false_alarms": 1},
                  "crack": {"n": 2, "image_auroc": 0.75, "pixel_auroc": 0.91, "aupro": None, "missed": 1},
                  "scratch<b>": {"n": 2, "image_auroc": 1.0, "pixel_auroc": 0.95, "aupro": 0.7, "missed": 0}},
        pixel_curves=curves, gallery=overlays,
        resolution="pixel metrics at 224x224 model input geometry (resize 256, centre crop 224)",
        settings={"backbone": "wide_resnet50_2", "resize": 256, "crop": [224, 224], "note": "<script>x</script>"},
        notes=["a note with <angle> & ampersand"])


def test_report_holds_what_it_claims(tmp_path):
    path = tmp_path / "report.html"
    first, second = make_category(), make_category("screw", threshold=None, pixels=False)
    write_report(path, [first, second], title="Eval <1>")
    text, page = parse(path)
    assert_self_contained(text, page)
    assert "<title>Eval &lt;1&gt;</title>" in text
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file is renamed, not left behind"

    figures = figures_of(page, "bottle & co")
    assert sorted(figures) == ["image-pr", "image-roc", "pixel-pr", "pixel-roc", "score-histogram"]
    assert all(len(v) == 1 for v in figures.values())
    for kind, words in [("image-roc", "image-level ROC"), ("image-pr", "image-level precision-recall"),
                        ("pixel-roc", "pixel-level ROC"), ("pixel-pr", "pixel-level precision-recall"),
                        ("score-histogram", "image score histogram")]:
        img = figures[kind][0]["img"]
        assert img["alt"] == f"bottle & co {words}" + ("" if kind == "score-histogram" else " curve")
        with Image.open(io.BytesIO(png_bytes(img["src"]))) as picture:
            assert picture.format == "PNG" and picture.width > 200 and picture.height > 150
    assert "threshold 2" in figures["score-histogram"][0]["caption"]
    assert "AUROC 87.5%" in figures["image-roc"][0]["caption"]  # 14 of 16 good/defect pairs ranked right
    assert "pixel AUROC 90.0%" in figures["pixel-roc"][0]["caption"]

    # the image-only category without a threshold: no pixel figures, a histogram that says so
    figures = figures_of(page, "screw")
    assert sorted(figures) == ["image-pr", "image-roc", "score-histogram"]
    assert "no calibrated threshold" in figures["score-histogram"][0]["caption"]
    assert "No pixel-level curves" in text

    # per-type rows, escaped names, percent values and counts
    rows = {r["attrs"]["data-type"]: r["cells"] for r in page.rows if "data-type" in r["attrs"]}
    assert set(rows) == {"good", "crack", "scratch<b>"}
    header = next(r["cells"] for r in page.rows if r["cells"] and r["cells"][0] == "defect type")
    crack = dict(zip(header, rows["crack"]))
    assert crack == {"defect type": "crack", "images": "2", "image AUROC": "75.0", "pixel AUROC": "91.0",
                     "AUPRO": "-", "false alarms at threshold": "-", "missed at threshold": "1"}
    assert dict(zip(header, rows["good"]))["false alarms at threshold"] == "1"
    assert "scratch&lt;b&gt;" in text and "<b>" not in text.replace("<body>", "")

    # gallery: the very bytes passed in, under the right kind, with their titles
    gallery = [f for f in page.figures if "data-gallery" in f["attrs"] and f["attrs"]["data-category"] == "bottle & co"]
    assert [(f["attrs"]["data-gallery"], f["caption"]) for f in gallery] == [
        ("false alarm", "good/002.png: score 2.5 > threshold 2"),
        ("missed defect", "crack/001.png: score 1.8 <= threshold 2")]
    for figure, item in zip(gallery, make_category().gallery):
        data = png_bytes(figure["img"]["src"])
        assert data == item.overlay_png
        with Image.open(io.BytesIO(data)) as picture:
            assert picture.size == (8, 6)
    assert figure["img"]["alt"] == item.title

    # headline metrics, resolution, notes and settings, all escaped
    joined = "".join(page.text)
    assert "224x224 model input geometry" in joined and "a note with <angle> & ampersand" in joined
    assert "<script>x</script>" in joined and "<script>" not in text  # shown as text, never as markup
    summary = [r["cells"] for r in page.rows if r["cells"] and r["cells"][0] in ("bottle & co", "screw")]
    assert summary[0][1] == "87.5%" and summary[0][-1] == "2" and summary[1][2] == "-" and summary[1][-1] == "none"
    assert [a["href"] for t, a in page.tags if t == "a"] == ["#cat-0-bottle-co", "#cat-1-screw"]
    assert {a["id"] for t, a in page.tags if t == "section"} == {"cat-0-bottle-co", "cat-1-screw"}


def test_a_category_of_good_images_only_and_an_empty_gallery(tmp_path):
    report = make_category(pixels=False)
    report.image_labels = np.zeros(8, dtype=int)
    report.defect_types = ["good"] * 8
    report.gallery, report.per_type = [], {}
    write_report(tmp_path / "r.html", [report])
    text, page = parse(tmp_path / "r.html")
    assert_self_contained(text, page)
    assert sorted(figures_of(page, "bottle & co")) == ["score-histogram"]
    assert "No image ROC" in text and "None." in text


def test_rewriting_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    write_report(path, [make_category()])
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    bad = make_category()
    bad.gallery = [GalleryItem("x", "false positive", tiny_png((0, 0, 0)))]
    with pytest.raises(ValueError, match="gallery kind"):
        write_report(tmp_path / "r.html", [bad])
    bad = make_category()
    bad.gallery = [GalleryItem("x", "false alarm", b"GIF89a")]
    with pytest.raises(ValueError, match="not a PNG"):
        write_report(tmp_path / "r.html", [bad])
    assert not list(tmp_path.iterdir())


def test_without_matplotlib_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ReportUnavailableError, match="needs matplotlib"):
        check_available()
    with pytest.raises(ReportUnavailableError, match=r"pip install 'patchcore\[report\]'") as info:
        write_report(tmp_path / "r.html", [make_category()])
    assert isinstance(info.value, PatchCoreError)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- gallery picks
def test_select_gallery_on_a_hand_made_case():
    scores = [0.5, 3.0, 2.0, 0.1, 2.0, 1.9, 5.0, 0.2, 1.0]
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    # good, highest first (ties in index order): 1 (3.0), 2 and 4 (2.0), 0 (0.5), 3 (0.1)
    # defect, lowest first: 7 (0.2), 8 (1.0), 5 (1.9), 6 (5.0)
    assert select_gallery(scores, labels, 1.5, k=3) == ([1, 2, 4], [7, 8, 5])
    assert select_gallery(scores, labels, None, k=10) == ([1, 2, 4, 0, 3], [7, 8, 5, 6])
    assert select_gallery(scores, labels, 1.5, k=0) == ([], [])
    assert select_gallery([1.0, 2.0], [0, 0], None) == ([1, 0], [])
    with pytest.raises(ValueError):
        select_gallery([1.0], [0, 1], None)


# ------------------------------------------------------------------------------------ curves
def test_curves_agree_with_the_metrics_module():
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + labels, 1)  # many ties
    fpr, tpr, _ = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(labels, scores), abs=1e-12)
    recall, precision, _ = pr_curve(labels, scores)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300))
    assert f1 == pytest.approx(f1_max(labels, scores)[0], abs=1e-12)
    (fpr2, tpr2, t2), (recall2, precision2, _) = roc_and_pr_curves(labels, scores)
    np.testing.assert_array_equal(fpr2, fpr)
    np.testing.assert_array_equal(tpr2, tpr)
    np.testing.assert_array_equal(recall2, recall)
    np.testing.assert_array_equal(precision2, precision)
    sklearn = pytest.importorskip("sklearn.metrics")
    sk_fpr, sk_tpr, _ = sklearn.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert average_precision(recall, precision) == pytest.approx(sklearn.average_precision_score(labels, scores))

    x, y = subsample_curve(np.linspace(0, 1, 10_000), np.linspace(0, 1, 10_000) ** 2, max_points=100)
    assert len(x) <= 102 and x[0] == 0 and x[-1] == 1 and np.all(np.diff(x) > 0)


# --------------------------------------------------------------------------- category_report
def test_category_report_from_maps_masks_and_pictures(tmp_path):
    rng = np.random.default_rng(1)
    n, h, w = 6, 12, 16
    labels = np.array([0, 0, 0, 1, 1, 1])
    types = ["good", "good", "good", "dent", "dent", "hole"]
    masks = np.zeros((n, h, w), dtype=bool)
    masks[3, 2:6, 3:8] = masks[4, 7:11, 9:14] = masks[5, 1:4, 1:4] = True
    maps = (rng.random((n, h, w)) + 1.5 * masks).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1).astype(np.float64)
    pictures = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    asked = []

    def picture(i):
        asked.append(i)
        return pictures[i]

    metrics = {"image_auroc": auroc(labels, scores), **pixel_metrics(masks, maps),
               "image_f1_max": f1_max(labels, scores)[0]}
    report = category_report("cable", scores, labels, types, threshold=float(np.sort(scores)[2]), metrics=metrics,
                             resolution="at 12x16", settings={"k": 1}, maps=maps, masks=masks,
                             pixel_threshold=1.2, pictures=picture, files=[f"f{i}.png" for i in range(n)], k=2)
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 4  # only the gallery images are drawn
    assert [item.kind for item in report.gallery] == ["false alarm"] * 2 + ["missed defect"] * 2
    threshold = report.threshold
    for item, i in zip(report.gallery, [*np.flatnonzero(labels == 0)[np.argsort(-scores[labels == 0])][:2],
                                        *np.flatnonzero(labels == 1)[np.argsort(scores[labels == 1])][:2]]):
        verdict = {(0, True): "false alarm", (0, False): "passed", (1, True): "detected", (1, False): "missed"}
        assert item.title.startswith(f"f{i}.png ({types[i]}): score ")
        assert item.title.endswith(verdict[labels[i], bool(scores[i] > threshold)])
    for item in report.gallery:
        with Image.open(io.BytesIO(item.overlay_png)) as image:
            assert image.format == "PNG" and image.size == (w, h)
    assert set(report.per_type) == {"good", "dent", "hole"}
    subset = np.array([True, True, True, True, True, False])
    assert report.per_type["dent"]["pixel_auroc"] == pytest.approx(pixel_metrics(masks[subset], maps[subset])
                                                                    ["pixel_auroc"])
    assert report.per_type["dent"]["n"] == 2 and report.per_type["hole"]["n"] == 1
    fpr, tpr = report.pixel_curves["roc"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics["pixel_auroc"], abs=1e-9)  # not subsampled here
    write_report(tmp_path / "report.html", [report])
    text, page = parse(tmp_path / "report.html")
    assert_self_contained(text, page)
    assert sorted(figures_of(page, "cable")) == ["image-pr", "image-roc", "pixel-pr", "pixel-roc", "score-histogram"]

    # image-only: no maps, no masks -> no pixel curves, no pixel columns; pictures alone make the gallery
    plain = category_report("cable", scores, labels, types, threshold=None, metrics=metrics, resolution="none",
                            settings={}, pictures=lambda i: pictures[i])
    assert plain.pixel_curves is None and "pixel_auroc" not in plain.per_type["dent"]
    assert len(plain.gallery) == 6 and "no threshold" in plain.gallery[0].title
    quick = category_report("cable", scores, labels, types, threshold=None, metrics=metrics, resolution="r",
                            settings={}, maps=maps, masks=masks, per_type_pixels=False)
    assert quick.pixel_curves is not None and "pixel_auroc" not in quick.per_type["dent"]
    assert len(quick.gallery) == 6  # without pictures the overlays are the heat alone: all 3 good, all 3 defects


def test_category_report_takes_precomputed_rows_curves_and_a_mask_mapping(tmp_path):
    """evaluate's own per-type rows and (binned, original-resolution) curves pass through; masks by index."""
    rng = np.random.default_rng(2)
    n, h, w = 5, 10, 10
    labels = np.array([0, 0, 1, 1, 1])
    types = ["good", "good", "dent", "dent", "hole"]
    by_index = {2: np.zeros((h, w), bool), 4: np.zeros((h, w), bool)}  # image 3 has no mask file
    by_index[2][2:5, 2:5] = by_index[4][6:9, 6:9] = True
    maps = rng.random((n, h, w)).astype(np.float32)
    maps[2, 2:5, 2:5] += 1
    scores = np.array([0.9, 1.0, 0.2, 1.5, 0.95])
    rows = {"dent": {"n": 2, "image_auroc": 0.5, "pixel_auroc": 0.75, "pixel_f1_max": 0.25, "aupro": 0.125},
            "hole": {"n": 1, "image_auroc": 0.5, "pixel_auroc": None, "pixel_f1_max": None, "aupro": None}}
    x = np.linspace(0, 1, 8193)
    curves = {"roc": (x, np.sqrt(x)), "pr": (x, 1 - x ** 2)}
    report = category_report("pill", scores, labels, types, threshold=0.97, metrics={}, resolution="original",
                             settings={}, maps=maps, masks=by_index, per_type=rows, pixel_curves=curves,
                             pictures=lambda i: np.full((h, w, 3), 128, np.uint8), k=1)
    assert report.per_type == {"good": {"n": 2, "false_alarms": 1},
                               "dent": {**rows["dent"], "missed": 1}, "hole": {**rows["hole"], "missed": 1}}
    assert rows["dent"] == {"n": 2, "image_auroc": 0.5, "pixel_auroc": 0.75, "pixel_f1_max": 0.25, "aupro": 0.125}
    fpr, tpr = report.pixel_curves["roc"]
    assert 100 < len(fpr) <= 2002 and fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    missed = report.gallery[-1]
    assert missed.kind == "missed defect" and missed.title.startswith("#2 (dent)")
    with Image.open(io.BytesIO(missed.overlay_png)) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert np.all(pixels[2, 2] == (255, 0, 255)) and not np.any(np.all(pixels[6:9, 6:9] == (255, 0, 255), -1))

    # without precomputed curves the mapping gives the same curves as the full stack
    stack = np.zeros((n, h, w), bool)
    for i, m in by_index.items():
        stack[i] = m
    a = category_report("pill", scores, labels, types, threshold=None, metrics={}, resolution="", settings={},
                        maps=maps, masks=by_index)
    b = category_report("pill", scores, labels, types, threshold=None, metrics={}, resolution="", settings={},
                        maps=maps, masks=stack)
    for key in ("roc", "pr"):
        for u, v in zip(a.pixel_curves[key], b.pixel_curves[key]):
            np.testing.assert_array_equal(u, v)
    assert a.per_type == b.per_type and a.per_type["hole"]["pixel_auroc"] is not None
    write_report(tmp_path / "r.html", [report, a])
    text, page = parse(tmp_path / "r.html")
    assert_self_contained(text, page)
    header = next(r["cells"] for r in page.rows if r["cells"] and r["cells"][0] == "defect type")
    assert header == ["defect type", "images", "image AUROC", "pixel AUROC", "AUPRO", "pixel F1-max",
                      "false alarms at threshold", "missed at threshold"]
