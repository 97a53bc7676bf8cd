"""The model's input preprocessing: uint8 images -> resized, centre-cropped, normalised float tensors.

One code path for every input (files, arrays, decoded tensors on a GPU), so fitting and scoring always
see identically prepared pixels (MVTec protocol: resize 256, centre crop 224, ImageNet mean and std).

MAX_RESIZED_PIXELS caps the size after resizing (default 6144 x 6144 = 37.7 Mpx, so that a 20-megapixel
image can be inspected at its own size with --tile-size; the environment variable
PATCHCORE_MAX_RESIZED_PIXELS overrides it): the model input grows with it, and a shorter-side resize of a
thin strip would otherwise ask for gigabytes. `check_size` says whether an H x W image can go
through; read_image and iter_image_batches take it as `check=` to turn a refusal into that file's error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from . import sizing
from .resize import resize_crop_rgb, resize_rgb
from .sizing import MAX_RESIZED_PIXELS  # noqa: F401 - the bound lives with the size rules


@dataclass(frozen=True)
class Preprocess:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, h, w): resize, centre crop, normalise.

    One code path for every input (files, arrays, decoded tensors on a GPU), so fitting and
    scoring always see identically prepared pixels.
    """

    resize: tuple[int, int] | int | None
    crop: tuple[int, int] | int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float | None = None  # one factor for every image (io/sizing.py); resize and crop are then None
    align: int = 1  # sides under the scale rule are multiples of this (the deepest feature stride)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        size = self.resized_size(height, width)
        if self.crop is not None:
            size = sizing.pair(self.crop)
        return size

    def check_size(self, height: int, width: int) -> None:
        """Raise InputError if an H x W image is empty, resizes to more than MAX_RESIZED_PIXELS, or is
        smaller than the crop after resizing (io/sizing.py, the runtime's check too)."""
        sizing.check_model_input(height, width, self.resize, self.crop, scale=self.scale, align=self.align)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the centre crop inside the resized image of an H x W input."""
        size = self.resized_size(height, width)
        box = sizing.crop_box(size, self.crop)
        if box is None:
            ch, cw = sizing.pair(self.crop)
            raise InputError(f"crop {ch}x{cw} is larger than the resized image {size[0]}x{size[1]}")
        return box

    def mask_geometry(self, mask: np.ndarray) -> np.ndarray:
        """bool (H, W) at image size -> bool (h, w) aligned with the maps: the image's resize (nearest
        neighbour, so the mask stays binary), then the same centre crop."""
        height, width = mask.shape
        size = self.resized_size(height, width)
        picture = Image.fromarray(mask.astype(np.uint8) * 255)
        if size != (height, width):
            picture = picture.resize((size[1], size[0]), Image.Resampling.NEAREST)
        top, left, h, w = self.crop_box(height, width)
        return np.asarray(picture)[top:top + h, left:left + w] > 0

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return sizing.resized_size(height, width, self.resize, scale=self.scale, align=self.align)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.check_size(*images.shape[-2:])
        return self.normalise(self._resize_crop(images))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) already at the model input size (resized and cropped) -> normalised float."""
        x = images.float().div_(255.0)  # a new, contiguous copy
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        # In place: one float copy of the input alive, not three (a 20-megapixel image is 240 MB of float32).
        return x.sub_(mean).div_(std)

    def geometry(self, image: torch.Tensor) -> torch.Tensor:
        """The same resize and crop without normalisation: the picture the maps align with."""
        self.check_size(*image.shape[-2:])
        return self._resize_crop(image[None])[0]

    def _resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> uint8 (B, 3, h, w) resized and centre-cropped; bilinear with antialiasing, as
        PIL's resize in the MVTec protocol code, and like PIL in 8 bit: 5x faster on CPU than in float, and 1/4
        the memory. On CPU only the kept pixels are computed where that gives the same bytes (io/resize.py)."""
        height, width = images.shape[-2:]
        size = self.resized_size(height, width)
        top, left, ch, cw = box = self.crop_box(height, width)
        if size == (height, width):  # at its size already (e.g. tiles at scale 1): a crop at most, no copy
            return images[..., top:top + ch, left:left + cw]
        if images.device.type == "cpu":
            arrays = images.permute(0, 2, 3, 1).numpy()
            return torch.from_numpy(np.stack([resize_crop_rgb(a, size, box) for a in arrays])).permute(0, 3, 1, 2)
        return resize_uint8(images, size, in_float=True)[..., top:top + ch, left:left + cw]


def resize_uint8(images: torch.Tensor, size: tuple[int, int], *, in_float: bool) -> torch.Tensor:
    """Bilinear antialiased resize of a uint8 batch, to uint8. On CPU Pillow's kernel image by image
    (io/resize.py: the torch-free runtime's, so both paths see the same pixels); elsewhere (CUDA) resize in
    float and round, which agrees with it to within 1 grey level."""
    if not in_float:
        arrays = images.permute(0, 2, 3, 1).numpy()
        return torch.from_numpy(np.stack([resize_rgb(a, size) for a in arrays])).permute(0, 3, 1, 2)
    x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)
