"""What the estimator accepts as images, and how it walks them in batches.

One image is a path, a string, a PIL image, an array or a (3, H, W) tensor; anything else that is a
sequence is several images. A uint8 (B, 3, H, W) tensor is a batch. Empty images (a 0 x 0 array, a
tensor with no pixels) are an InputError. PIL images are turned upright by their EXIF orientation, like
files; arrays and tensors carry no EXIF and are used as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ImageReadError, InputError
from ..io.images import LoadedBatch, as_uint8_tensor, iter_image_batches, read_image

ImageInput = str | Path | np.ndarray | Image.Image | torch.Tensor


def as_image_list(images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> list:
    """One image or a sequence of images -> a list of images (a batch tensor -> its (3, H, W) images)."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.ndim == 4 and images.numel() == 0 and images.shape[0] > 0:
            raise InputError(f"empty images: batch tensor of shape {tuple(images.shape)}")
        return [images] if images.ndim == 3 else list(images.unbind(0))
    return list(images)


def iter_batches(images: list, batch_size: int, *, check: Callable[[int, int], None] | None = None,
                 prepare: Callable[[np.ndarray], object] | None = None) -> Iterator[LoadedBatch]:
    """Paths are decoded in background threads; in-memory images are converted in place.

    `check(H, W)` (e.g. Preprocess.check_size) refuses an image by raising InputError: for a file, that
    file's ImageReadError in `failures`; for an in-memory image, the InputError itself. `prepare`: run on each
    decoded file in its background thread (iter_image_batches), results in `batch.prepared`; in-memory
    images are not prepared (their batches have no `prepared`)."""
    if all(isinstance(im, (str, Path)) for im in images):
        yield from iter_image_batches(images, batch_size, check=check, prepare=prepare)
        return
    for start in range(0, len(images), batch_size):
        batch = LoadedBatch([], [], [])
        for image in images[start:start + batch_size]:
            if isinstance(image, (str, Path)):
                try:
                    batch.images.append(as_uint8_tensor(read_image(image, check=check)))
                    batch.paths.append(Path(image))
                except ImageReadError as err:
                    batch.failures.append(err)
            else:
                tensor = as_uint8_tensor(image)
                if check is not None:
                    check(*tensor.shape[-2:])
                batch.images.append(tensor)
        yield batch

