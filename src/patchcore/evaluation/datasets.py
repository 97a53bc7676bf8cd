"""Evaluation data on disk: where the training images, test images and ground-truth masks are.

Two layouts (the README's "Evaluation data" section is the user-facing description):

MVTec AD             <cat>/train/good/*        <cat>/test/good/*, <cat>/test/<defect>/*
                     <cat>/ground_truth/<defect>/<stem>_mask.png  (or <stem>.png)
generic folder       <cat>/good/*, <cat>/<defect>/*   (the test set)
                     <cat>/train/good/* or <cat>/train/*  (training images; else pass --train DIR)
                     optional masks: <cat>/masks/<defect>/<stem>[_mask].<ext> (or ground_truth/...)

Masks are paired with images by file stem, never by sort order (see PATCHCORE.md). Masks are all or
nothing per category: with no mask folder there are no pixel metrics; with one, every defect image
needs its mask and a missing one is an error naming the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ImageOps

from ..errors import ConfigError, DatasetError, ImageReadError
from ..io.images import IMAGE_SUFFIXES, check_complete, check_limits, header_size, open_image, read_error

GOOD = "good"
MASK_FOLDERS = ("ground_truth", "masks")  # first one found wins
TRAIN_FOLDER = "train"
# Folder names that are never a defect type in the generic layout.
RESERVED = {GOOD, TRAIN_FOLDER, "test", *MASK_FOLDERS}


@dataclass(frozen=True)
class TestItem:
    __test__ = False  # not a pytest test class

    path: Path
    defect_type: str  # "good" or the defect folder's name
    label: int  # 0 good, 1 defect
    mask_path: Path | None  # None: good image, or a category without masks


@dataclass
class TestSet:
    """One category: training (nominal) images and the labelled test split."""

    __test__ = False

    name: str
    root: Path
    layout: str  # "mvtec" or "folder"
    train: list[Path]
    items: list[TestItem]
    mask_root: Path | None  # None: no ground truth, image metrics only
    notes: list[str] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return self.mask_root is not None

    @property
    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    @property
    def defect_types(self) -> list[str]:
        return sorted({item.defect_type for item in self.items})


# ------------------------------------------------------------------------------------ discovery
def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def layout_of(folder: str | Path) -> str | None:
    """'mvtec', 'folder' or None (not a category)."""
    folder = Path(folder)
    if (folder / TRAIN_FOLDER / GOOD).is_dir() and (folder / "test").is_dir():
        return "mvtec"
    if (folder / GOOD).is_dir():
        return "folder"
    return None


def find_categories(root: str | Path, names: list[str] | None = None) -> list[Path]:
    """A root that is itself a category -> [root]; a folder of categories -> its categories, sorted.

    `names` keeps only those categories (an unknown name is an error listing the ones found).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if layout_of(root) is not None:
        found = [root]
    else:
        found = sorted(p for p in root.iterdir() if p.is_dir() and layout_of(p) is not None)
    if not found:
        raise DatasetError(
            f"{root}: no category found. Expected MVTec layout (<category>/train/good and <category>/test/<type>) "
            f"or the folder layout (<category>/good and <category>/<defect>), either at {root} or one level below")
    if names:
        by_name = {p.name: p for p in found}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DatasetError(f"{root}: no category {', '.join(map(repr, unknown))}; found {', '.join(by_name)}")
        found = [by_name[n] for n in dict.fromkeys(names)]
    return found


def load_split(category_dir: str | Path, *, train: str | Path | None = None) -> TestSet:
    """List the training images and the labelled test images (with their masks) of one category.

    `train` overrides the training folder (required in the folder layout without <cat>/train).
    Raises DatasetError for a missing folder, an empty split, a defect image without its mask, or
    training images that are also test images.
    """
    category_dir = Path(category_dir)
    layout = layout_of(category_dir)
    if layout is None:
        raise DatasetError(f"{category_dir}: not a category folder (no train/good + test/, nor good/)")
    test_root = category_dir / "test" if layout == "mvtec" else category_dir
    mask_root = next((category_dir / m for m in MASK_FOLDERS if (category_dir / m).is_dir()), None)

    notes = []
    types = [GOOD] + sorted(p.name for p in test_root.iterdir()
                            if p.is_dir() and p.name != GOOD and not (layout == "folder" and p.name in RESERVED))
    items: list[TestItem] = []
    missing: list[Path] = []
    for defect_type in types:
        folder = test_root / defect_type
        if not folder.is_dir():
            continue
        label = 0 if defect_type == GOOD else 1
        masks = mask_index(mask_root / defect_type) if label and mask_root is not None else {}
        for path in _images(folder):
            mask = masks.get(path.stem)
            if label and mask_root is not None and mask is None:
                missing.append(path)
            items.append(TestItem(path, defect_type, label, mask))
    if missing:
        shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"defect image without a ground-truth mask: {shown} (looked in {mask_root}/<defect>/ "
                           f"for <stem>_mask.<ext> or <stem>.<ext>); add the masks, or remove the {mask_root.name} "
                           f"folder to evaluate image-level metrics only")
    if not any(i.label == 0 for i in items):
        raise DatasetError(f"{test_root / GOOD}: no good test images (image AUROC needs both classes)")
    if not any(i.label == 1 for i in items):
        raise DatasetError(f"{test_root}: no defect test images (one folder per defect type, next to {GOOD}/)")
    if mask_root is None:
        notes.append(f"no ground-truth masks ({' or '.join(MASK_FOLDERS)} folder absent): image metrics only")

    train_paths = _train_images(category_dir, layout, train)
    shared = {p.resolve() for p in train_paths} & {i.path.resolve() for i in items}
    if shared:
        raise DatasetError(f"{len(shared)} training image(s) are also test images (e.g. {sorted(shared)[0]}): "
                           f"that would leak the test set into the model")
    return TestSet(category_dir.name, category_dir, layout, train_paths, items, mask_root, notes)


def _train_images(category_dir: Path, layout: str, train: str | Path | None) -> list[Path]:
    if train is not None:
        folder = Path(train)
    elif (category_dir / TRAIN_FOLDER / GOOD).is_dir():
        folder = category_dir / TRAIN_FOLDER / GOOD
    elif (category_dir / TRAIN_FOLDER).is_dir():
        folder = category_dir / TRAIN_FOLDER
    else:
        raise DatasetError(f"{category_dir}: no training images; put defect-free images in "
                           f"{category_dir / TRAIN_FOLDER / GOOD} or pass --train DIR")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: training folder does not exist")
    paths = _images(folder)
    if not paths:
        raise DatasetError(f"{folder}: no training images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def mask_index(folder: Path) -> dict[str, Path]:
    """Image stem -> its mask in `folder`: <stem>_mask.<ext> (MVTec) wins over <stem>.<ext>."""
    if not folder.is_dir():
        return {}
    files = _images(folder)
    index = {p.stem: p for p in files}
    index.update({p.stem[:-len("_mask")]: p for p in files if p.stem.endswith("_mask")})
    return index


# ------------------------------------------------------------------------------------ masks
def read_mask(path: str | Path) -> np.ndarray:
    """A mask file -> bool (H, W); any non-zero value is defect ({0, 255}, 1-bit {0, 1}, 16-bit, RGB).

    Opened as read_image opens images (io.images.open_image: the same formats and limits)."""
    path = Path(path)
    try:
        with open_image(path) as image:
            check_limits(image.height, image.width)  # the image limits, before decoding (bombs)
            image.load()
            check_complete(path, image)  # a PNG cut short would be a mask with black rows
            image = ImageOps.exif_transpose(image)  # the same orientation as read_image gives the picture
            if image.mode == "P":
                image = image.convert("RGB")  # palette indices say nothing about black
            arr = np.asarray(image)
    except ConfigError:
        raise
    except Exception as err:  # whatever a decoder raises on a hostile file is that mask's error
        raise DatasetError(f"{path}: unreadable mask ({read_error(path, err).reason})") from None
    if arr.ndim == 3:
        arr = arr[..., :3].any(axis=-1) if arr.shape[-1] in (3, 4) else arr[..., 0]
    return arr != 0


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as read_image returns it (EXIF rotation applied), from its header."""
    try:
        return header_size(path)
    except ImageReadError as err:
        raise DatasetError(f"{path}: unreadable image ({err.reason})") from None
