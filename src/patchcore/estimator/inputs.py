"""What the estimator accepts as images, and how it walks them: batches -> same-size stacks.

One image is a path, a string, a PIL image, an array or a (3, H, W) tensor; anything else that is a
sequence is several images. A uint8 (B, 3, H, W) tensor is a batch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io.images import LoadedBatch, as_uint8_tensor, iter_image_batches, read_image
from ..errors import ImageReadError

ImageInput = str | Path | np.ndarray | Image.Image | torch.Tensor


def as_image_list(images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> list:
    """One image or a sequence of images -> a list of images (a batch tensor -> its (3, H, W) images)."""
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, torch.Tensor):
        return [images] if images.ndim == 3 else list(images.unbind(0))
    return list(images)


def iter_batches(images: list, batch_size: int) -> Iterator[LoadedBatch]:
    """Paths are decoded in background threads; in-memory images are converted in place."""
    if all(isinstance(im, (str, Path)) for im in images):
        yield from iter_image_batches(images, batch_size)
        return
    for start in range(0, len(images), batch_size):
        batch = LoadedBatch([], [], [])
        for image in images[start:start + batch_size]:
            if isinstance(image, (str, Path)):
                try:
                    batch.images.append(as_uint8_tensor(read_image(image)))
                    batch.paths.append(Path(image))
                except ImageReadError as err:
                    batch.failures.append(err)
            else:
                batch.images.append(as_uint8_tensor(image))
        yield batch


def same_size_stacks(images: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Consecutive runs of equally sized (3, H, W) images, stacked (order kept)."""
    run: list[torch.Tensor] = []
    for image in images:
        if run and image.shape != run[0].shape:
            yield torch.stack(run)
            run = []
        run.append(image)
    if run:
        yield torch.stack(run)
