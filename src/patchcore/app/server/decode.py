"""Uploaded bytes -> a (3, H, W) uint8 image, through the same reader as the CLI (patchcore.io.images).

Checks come first and cheaply: size in bytes, then the format and pixel count from the header alone,
before anything is decoded. Each refusal is an UploadError carrying its HTTP status.
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings

import torch
from PIL import Image

from ...errors import ImageReadError
from ...io.images import as_uint8_tensor, read_image

# Formats read_image decodes, by PIL's name -> the suffix a stored copy gets.
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
            "PPM": ".ppm"}  # MPO: the multi-picture JPEG many cameras write (read as its first picture, as the CLI)


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def probe(data: bytes, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) from the header, or UploadError 415 (not an image we read) / 413 (too many pixels)."""
    if not data:
        raise UploadError(422, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, size = image.format, image.size
    except Image.UnidentifiedImageError:
        raise UploadError(415, "not an image this server reads (PNG, JPEG, BMP, TIFF, WebP, PPM/PGM)") from None
    except Image.DecompressionBombError as err:  # PIL's own ceiling (2 x MAX_IMAGE_PIXELS), before ours
        raise UploadError(413, f"image over this server's limit of {max_pixels} pixels ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UploadError(422, f"corrupt image header ({err})") from None
    if fmt not in SUFFIXES:
        raise UploadError(415, f"{fmt} images are not accepted; send PNG, JPEG, BMP, TIFF, WebP or PPM/PGM")
    if size[0] * size[1] > max_pixels:
        raise UploadError(413, f"image of {size[0]} x {size[1]} pixels is over this server's limit of "
                               f"{max_pixels} pixels")
    return fmt, size


def decode_upload(data: bytes, max_pixels: int, check=None) -> tuple[torch.Tensor, str]:
    """-> ((3, H, W) uint8, suffix). Decoded by read_image from a private temporary file, so uploads get
    exactly the CLI's conversion (to_rgb_uint8, EXIF orientation). `check(height, width)` runs on the
    header's size before anything is decoded (it raises UploadError: the per-request memory bound)."""
    fmt, (width, height) = probe(data, max_pixels)
    if check is not None:
        check(height, width)
    suffix = SUFFIXES[fmt]
    fd, name = tempfile.mkstemp(prefix="patchcore-upload-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            return as_uint8_tensor(read_image(name)), suffix
        except ImageReadError as err:
            raise UploadError(422, f"could not decode the image: {err.reason}") from None
    finally:
        os.unlink(name)
