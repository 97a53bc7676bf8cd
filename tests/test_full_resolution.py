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


def test_iter_predict_keeps_each_size_at_its_own_map_size(tmp_path):
    """resize none: a batch of mixed sizes comes back in input order, each map at its own size, none lost."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    train = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    model = PatchCore(PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None, coreset_ratio=0.5,
                                      calibration_ratio=0.0, batch_size=8), device="cpu").fit(train)
    paths = []
    for i, (h, w) in enumerate([(48, 64), (48, 64), (32, 96), (48, 64), (64, 64)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    batches = list(model.iter_predict(paths))
    assert [p.name for b in batches for p in b.paths] == [p.name for p in paths]
    assert len(batches) == 1 and isinstance(batches[0].result.maps, list)
    assert [tuple(m.shape) for m in batches[0].result.maps] == [(48, 64), (48, 64), (32, 96), (48, 64), (64, 64)]
    alone = torch.cat([model.predict(p).scores for p in paths])
    torch.testing.assert_close(batches[0].result.scores, alone)


def test_predict_writes_full_resolution_outputs_with_unseen_pixels_marked(category, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from patchcore.app.cli import main

    model_path = tmp_path / "m.model"
    assert main(["fit", str(category / "train" / "good"), "-o", str(model_path), "--backbone", "resnet18_random",
                 "--resize", "64", "--crop", "48", "--quiet", "--device", "cpu"]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(model_path), str(category / "test" / "hole"), "-o", str(out), "--quiet",
                 "--full-resolution", "--save-maps"]) == 0
    summary = json.loads((out / "scores.json").read_text())
    assert summary["map_geometry"]["outputs_at"].startswith("each input image's own size")
    name = summary["images"][0]["name"]
    heat = np.asarray(Image.open(out / "heatmaps" / f"{name}.png"))
    mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
    raw = np.load(out / "maps" / f"{name}.npy")
    assert heat.shape[:2] == mask.shape == raw.shape == (128, 128)  # the images' own size, not 48 x 48
    unseen = np.isnan(raw)
    # the crop keeps the middle 48/64 of the image: a border of 16 pixels at full size is unseen
    assert unseen[:14].all() and unseen[-14:].all() and not unseen[20:108, 20:108].any()
    assert (mask[unseen] == 128).all() and set(np.unique(mask[~unseen])) <= {0, 255}
    assert (heat[unseen] == 128).all()


def test_large_images_go_through_the_backbone_a_few_at_a_time(monkeypatch):
    """Above MAX_FORWARD_PIXELS per pass a batch is split (bounded memory); the model is the same."""
    import numpy as np

    import patchcore.estimator.model as model_module

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    config = PatchCoreConfig(backbone="resnet18_random", resize=None, crop=None, coreset_ratio=0.3,
                             calibration_ratio=0.0, batch_size=6)
    whole = PatchCore(config, device="cpu").fit(images)
    parts = []
    real = model_module._forward_sized
    monkeypatch.setattr(model_module, "MAX_FORWARD_PIXELS", 2 * 64 * 64)
    monkeypatch.setattr(model_module, "_forward_sized", lambda stack: parts.append(real(stack)) or parts[-1])
    split = PatchCore(config, device="cpu").fit(images)
    assert [len(p) for p in parts] == [3] and all(p.shape[0] == 2 for p in parts[0])
    torch.testing.assert_close(split.memory_bank_, whole.memory_bank_, rtol=1e-5, atol=1e-5)
