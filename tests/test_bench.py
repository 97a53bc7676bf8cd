"""`patchcore bench` reports every figure the speed issue asks for, on a small synthetic category."""
from __future__ import annotations

import json

import pytest

from patchcore.app.cli import main


def test_bench_reports_fit_split_latency_throughput_memory_and_accuracy(category, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(category), "-o", str(out), "--backbone", "resnet18_random", "--resize", "64",
                 "--crop", "none", "--throughput-batch", "4", "--quiet", "--device", "cpu"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["fit_s"] >= result["fit_embed_s"] + result["fit_coreset_s"] > 0
    assert result["predict_ms_per_image_from_files"] > 0 and result["latency_ms_batch1_median"] > 0
    assert result["throughput_batch"] == 4 and result["throughput_images_per_s"] > 0
    assert result["peak_rss_mib"] >= result["peak_rss_after_fit_mib"] > 100
    assert 0.0 <= result["image_auroc"] <= 1.0 and 0.0 <= result["pixel_auroc"] <= 1.0
    assert result["n_test_images"] == 18 and result["settings"]["config"]["backbone"] == "resnet18_random"
    assert result["n_patches"] == 20 * 64  # every training image in the bank (thresholds out-of-fold), 8 x 8 each
    per_million = 1e6 * result["fit_coreset_s"] / result["n_patches"]
    assert result["coreset_s_per_million_patches"] == pytest.approx(per_million)
    assert "throughput" in capsys.readouterr().err
