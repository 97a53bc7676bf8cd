"""Dataset layouts: discovery, splits, masks paired by stem (never by sort order), clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchcore.errors import DatasetError
from patchcore.evaluation.datasets import find_categories, image_size, layout_of, load_split, read_mask
from patchcore.evaluation.synthetic import make_category


def _grey(path, value=128, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "mvtec"
    make_category(root / "fabric", n_train=4, n_test_good=2, n_test_per_defect=2, size=32)
    make_category(root / "cloth", n_train=3, n_test_good=1, n_test_per_defect=1, size=32, seed=1)
    (root / "license.txt").write_text("not a category")
    return root


def test_mvtec_discovery_and_split(mvtec):
    assert [p.name for p in find_categories(mvtec)] == ["cloth", "fabric"]
    assert [p.name for p in find_categories(mvtec / "fabric")] == ["fabric"]  # a root that is a category
    assert [p.name for p in find_categories(mvtec, ["fabric"])] == ["fabric"]
    split = load_split(mvtec / "fabric")
    assert split.layout == "mvtec" and split.has_masks
    assert len(split.train) == 4
    assert split.defect_types == ["good", "hole", "scratch", "stain"]
    assert split.labels == [0, 0] + [1] * 6
    for item in split.items:
        if item.label:
            assert item.mask_path == mvtec / "fabric" / "ground_truth" / item.defect_type / f"{item.path.stem}_mask.png"
        else:
            assert item.mask_path is None


def test_unknown_category_and_empty_root(mvtec, tmp_path):
    with pytest.raises(DatasetError, match="no category 'bottle'; found cloth, fabric"):
        find_categories(mvtec, ["bottle"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no category found"):
        find_categories(tmp_path / "empty")


def test_masks_matched_by_stem_not_order(tmp_path):
    # Mask names sort differently from image names; plain <stem>.png masks are accepted too.
    root = tmp_path / "cat"
    for i in range(3):
        _grey(root / "train" / "good" / f"{i}.png")
    _grey(root / "test" / "good" / "g.png")
    for stem in ("b", "a10", "a9"):
        _grey(root / "test" / "crack" / f"{stem}.png")
    _grey(root / "ground_truth" / "crack" / "a10_mask.png")
    _grey(root / "ground_truth" / "crack" / "a9.png")
    _grey(root / "ground_truth" / "crack" / "b_mask.png")
    _grey(root / "ground_truth" / "crack" / "b.png")  # <stem>_mask wins over <stem>
    split = load_split(root)
    masks = {i.path.stem: i.mask_path.name for i in split.items if i.label}
    assert masks == {"a10": "a10_mask.png", "a9": "a9.png", "b": "b_mask.png"}


def test_defect_image_without_mask_is_an_error_naming_it(tmp_path):
    root = make_category(tmp_path / "cat", n_train=2, n_test_good=1, n_test_per_defect=2, size=32)
    (root / "ground_truth" / "stain" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"without a ground-truth mask: .*stain/001\.png"):
        load_split(root)


@pytest.mark.parametrize("values", [(0, 255), (0, 1)])
def test_any_nonzero_mask_value_is_defect(tmp_path, values):
    arr = np.zeros((6, 8), np.uint8)
    arr[2:4, 3:6] = values[1]
    path = tmp_path / "m.png"
    Image.fromarray(arr).save(path)
    expected = arr > 0
    assert np.array_equal(read_mask(path), expected)
    Image.fromarray(arr > 0).convert("1").save(tmp_path / "one_bit.png")  # 1-bit PNG, {0, 1}
    assert Image.open(tmp_path / "one_bit.png").mode == "1"
    assert np.array_equal(read_mask(tmp_path / "one_bit.png"), expected)
    Image.fromarray(arr.astype(np.uint16) * 3).save(tmp_path / "sixteen.png")
    assert np.array_equal(read_mask(tmp_path / "sixteen.png"), expected)
    assert image_size(path) == (6, 8)


def test_generic_layout_with_and_without_masks(tmp_path):
    root = tmp_path / "parts"
    for i in range(3):
        _grey(root / "train" / "good" / f"t{i}.jpg")
    _grey(root / "good" / "g0.jpg")
    _grey(root / "good" / "g1.jpg")
    _grey(root / "dent" / "d0.jpg")
    _grey(root / "scratch" / "s0.jpg")
    assert layout_of(root) == "folder"
    split = load_split(root)
    assert split.layout == "folder" and not split.has_masks and split.notes
    assert [(i.defect_type, i.label, i.mask_path) for i in split.items] == [
        ("good", 0, None), ("good", 0, None), ("dent", 1, None), ("scratch", 1, None)]
    assert [p.name for p in split.train] == ["t0.jpg", "t1.jpg", "t2.jpg"]

    _grey(root / "masks" / "dent" / "d0.png")
    with pytest.raises(DatasetError, match=r"scratch/s0\.jpg"):  # masks are all or nothing
        load_split(root)
    _grey(root / "masks" / "scratch" / "s0_mask.png")
    split = load_split(root)
    assert split.has_masks and [i.mask_path.name for i in split.items if i.label] == ["d0.png", "s0_mask.png"]


def test_generic_layout_train_folder(tmp_path):
    root = tmp_path / "parts"
    _grey(root / "good" / "g0.png")
    _grey(root / "bad" / "b0.png")
    with pytest.raises(DatasetError, match="--train"):
        load_split(root)
    _grey(tmp_path / "elsewhere" / "t0.png")
    assert [p.name for p in load_split(root, train=tmp_path / "elsewhere").train] == ["t0.png"]
    with pytest.raises(DatasetError, match="leak"):  # test images used for training
        load_split(root, train=root / "good")


def test_split_needs_both_classes(tmp_path):
    root = tmp_path / "parts"
    _grey(root / "train" / "t0.png")  # <cat>/train/* is accepted in the folder layout
    _grey(root / "good" / "g0.png")
    with pytest.raises(DatasetError, match="no defect test images"):
        load_split(root)


def test_unreadable_or_bomb_masks_and_images_are_dataset_errors_naming_the_file(tmp_path):
    import zlib

    from patchcore.evaluation.datasets import image_size, read_mask

    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DatasetError, match="text.png: unreadable image"):
        image_size(tmp_path / "text.png")
    # an all-zero 20000 x 20000 grey PNG, a few hundred kB on disk
    raw = zlib.compress(b"".join(b"\x00" + bytes(20000) for _ in range(20000)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    (tmp_path / "bomb_mask.png").write_bytes(bomb)
    with pytest.raises(DatasetError, match="bomb_mask.png: unreadable mask"):
        read_mask(tmp_path / "bomb_mask.png")
