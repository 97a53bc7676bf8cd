"""Reading images from disk robustly: every failure is a per-file ImageReadError, and no file can crash the
process or take unbounded memory.

Every read error names the file. Grayscale, palette, RGBA, 16-bit and float images become 8-bit RGB
the same way on every path, so a model fitted on one kind scores the others consistently.

Pillow opens every file (formats, header, limits, EXIF) and decodes all but the commonest: 8-bit RGB/grey
PNG and RGB/grey JPEG go to io/fast_decode.py's libspng / libjpeg-turbo decoders where those are installed,
which give Pillow's exact pixels 2-4x faster; whatever such a decoder refuses goes to Pillow, whose verdict
stands. torchvision's decode_png (~1.6x faster on 8-bit PNGs) was dropped: it
kills the process with a segmentation fault on any libpng error once row decoding has begun (IDAT shorter
than the header declares, an IDAT CRC error, a bad filter byte, corrupt zlib data), and checking a file
well enough to rule those out costs a full inflate, which takes back the gain (NOTES-hardening-decode.md).
Only these formats are decoded, whatever the suffix: DECODE_FORMATS. Multi-frame files (TIFF, GIF, APNG)
give their first frame. EXIF orientation is applied for files and for in-memory PIL images alike; arrays
and tensors carry no EXIF and are taken as they are.

Limits, each a module constant that an environment variable overrides (read at every call):

- MAX_PIXELS (PATCHCORE_MAX_PIXELS): width x height from the file's header, checked before decoding.
  Default 8192 x 8192 = 67.1 Mpx (192 MiB as RGB). PIL refuses more than 2 x PIL.Image.MAX_IMAGE_PIXELS
  (179 Mpx) on its own; raise that too to go further.
- MAX_ASPECT_RATIO (PATCHCORE_MAX_ASPECT_RATIO): longer side / shorter side, checked before decoding.
  Default 32 (a 1 x 40000 strip would become 256 x 10,240,000 after a shorter-side resize).
- READAHEAD_BYTES (PATCHCORE_READAHEAD_BYTES): decoded bytes (3 per pixel, from the header) that
  iter_image_batches holds ahead of its consumer, besides the batch being filled. Default 256 MiB; one
  file is always allowed, however large.
- The size after resizing is capped in io/preprocess.py (MAX_RESIZED_PIXELS); pass its check as
  `check=` to read_image / iter_image_batches to make it a per-file error.
"""
from __future__ import annotations

import os
import stat
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, ImageReadError, InputError
from . import fast_decode

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".gif")
# PIL plugins tried on a file, by content (the suffix does not matter): the formats above (JPEG includes
# MPO, the multi-picture JPEG many cameras write: its first picture).
DECODE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM", "GIF")
MAX_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 32.0
READAHEAD_BYTES = 256 << 20

SizeCheck = Callable[[int, int], None]  # (height, width) -> None, or raises InputError saying why


def limit(name: str, default: float) -> float:
    """`default`, or the environment variable PATCHCORE_<name> when it is set (a positive number)."""
    text = os.environ.get(f"PATCHCORE_{name}", "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"PATCHCORE_{name}={text!r}: must be a positive number")
    return value


def check_limits(height: int, width: int) -> None:
    """Raise InputError if an H x W image is empty or beyond MAX_PIXELS or MAX_ASPECT_RATIO."""
    if height < 1 or width < 1:
        raise InputError(f"empty image ({height} x {width} pixels)")
    pixels, max_pixels = height * width, limit("MAX_PIXELS", MAX_PIXELS)
    if pixels > max_pixels:
        raise InputError(f"image too large: {width} x {height} = {pixels} pixels, above the limit of "
                         f"{max_pixels:.0f} pixels (MAX_PIXELS; raise it with PATCHCORE_MAX_PIXELS=<pixels>)")
    aspect, max_aspect = max(height, width) / min(height, width), limit("MAX_ASPECT_RATIO", MAX_ASPECT_RATIO)
    if aspect > max_aspect:
        raise InputError(f"extreme aspect ratio: {width} x {height} is {aspect:.4g}:1, above the limit "
                         f"{max_aspect:g}:1 (MAX_ASPECT_RATIO; raise it with PATCHCORE_MAX_ASPECT_RATIO=<ratio>)")


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Image files in a folder, sorted by name. An empty or missing folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files and folders (their images, sorted) as one list of paths, order kept."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        paths.extend(list_images(item) if item.is_dir() else [item])
    return paths


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8. 16-bit and float images are scaled by their type's range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0
    elif image.mode == "I":
        # PNG 16-bit greyscale decodes as mode "I"; values beyond 16 bit would be a 32-bit image.
        arr = np.asarray(image, dtype=np.int64)
        scale = 65535.0 if arr.max(initial=0) <= 65535 else float(2**32 - 1)
        arr = arr.astype(np.float32) / scale
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max(initial=0.0))
        arr = arr / top if top > 1.0 else arr
    else:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent areas become black, not whatever colour the pixels happen to hold.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    grey = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (itself when there is none)."""
    if image.getexif().get(0x0112) not in range(2, 9):
        return image
    return ImageOps.exif_transpose(image)


def open_regular_file(path: str | Path):
    """A regular file opened for binary reading; ImageReadError for anything else. Opened without blocking
    and checked on the open descriptor: a named pipe among the inputs would otherwise hang the run forever
    (open() waits for a writer), and a device could be read without end."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                    else "a device or socket")
            raise ImageReadError(Path(path), f"not a regular file ({kind}); only files are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """PIL's lazy open of a regular file, restricted to DECODE_FORMATS, PIL's per-file warnings silenced
    (our MAX_PIXELS applies; "Corrupt EXIF data" and the like are noise per file). Nothing is decoded yet."""
    with open_regular_file(path) as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(handle, formats=DECODE_FORMATS) as image:
            yield image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) of an opened, not yet decoded image as read_image returns it (EXIF orientation applied),
    without decoding: a PNG's EXIF is taken only from before its image data, as PIL's getexif would
    decode the whole image to look for an eXIf chunk after it (PIL writes it before)."""
    width, height = image.size
    if image.format == "PNG" and "exif" not in image.info:
        return height, width
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
        width, height = height, width
    return height, width


def read_error(path: Path, err: BaseException) -> ImageReadError:
    """The ImageReadError naming `path` for whatever opening or decoding it raised."""
    if isinstance(err, ImageReadError):
        return err
    if isinstance(err, InputError):
        return ImageReadError(path, str(err))
    if isinstance(err, Image.DecompressionBombError):  # PIL's own limit, 2 x PIL.Image.MAX_IMAGE_PIXELS
        return ImageReadError(path, f"image too large: {err} (our limit is {limit('MAX_PIXELS', MAX_PIXELS):.0f} "
                                    f"pixels, MAX_PIXELS; raise it with PATCHCORE_MAX_PIXELS=<pixels>, and "
                                    f"PIL.Image.MAX_IMAGE_PIXELS beyond PIL's)")
    if isinstance(err, Image.UnidentifiedImageError):
        return ImageReadError(path, "not an image file (or an unsupported format)")
    if isinstance(err, (OSError, SyntaxError, EOFError)):
        return ImageReadError(path, f"corrupt or truncated image ({err})")
    return ImageReadError(path, f"cannot decode ({type(err).__name__}: {err})")


def header_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as read_image returns it (EXIF orientation applied), from its header
    alone; ImageReadError naming the file when there is no readable header."""
    path = Path(path)
    try:
        with open_image(path) as image:
            return upright_size(image)
    except ConfigError:
        raise
    except Exception as err:  # whatever PIL raises on a hostile header is that file's error
        raise read_error(path, err) from None


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_rows_missing(path: Path) -> str | None:
    """Why a PNG's image data is shorter than its header declares, or None when it is complete.

    PIL fills the rows of a zlib stream that ends early with black and reports nothing (libpng says "Not
    enough image data"). Such rows are black, so read_image asks this only when the last row is: it inflates
    the IDAT chunks, counting bytes in 1 MiB pieces (a few ms for a 900 x 900 RGB image)."""
    data = path.read_bytes()
    if data[12:16] != b"IHDR" or len(data) < 33:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlace = data[24], data[25], data[28]
    bits = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 0) * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pass_width > 0 and pass_height > 0:
            expected += pass_height * (1 + (pass_width * bits + 7) // 8)
    inflater, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < expected:
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            chunk = data[pos + 8:pos + 8 + length]
            while chunk and got < expected and not inflater.eof:
                got += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
        elif kind == b"IEND":
            break
        pos += 12 + length
    if got >= expected:
        return None
    return f"PNG image data ends early: {got} of {expected} bytes ({got * height // max(expected, 1)} of {height} rows)"


def _last_row_blank(image: Image.Image) -> bool:
    """True when the decoded last row is all zero (RGBA, LA, PA: all transparent)."""
    return image.crop((0, image.height - 1, image.width, image.height)).getbbox() is None


def check_complete(path: Path, image: Image.Image) -> None:
    """After image.load(): raise ImageReadError if a PNG's image data ended early (PIL filled black rows)."""
    if image.format == "PNG" and _last_row_blank(image):
        missing = _png_rows_missing(path)
        if missing:
            raise ImageReadError(path, missing)


def _fast_pixels(image: Image.Image) -> np.ndarray | None:
    """read_image's pixels for an opened (not decoded) file through io/fast_decode.py's faster decoder of its
    format, or None: the format has none here, the file is not one it decodes exactly as Pillow, or anything
    on this path raised (Pillow then decodes the file and gives the verdict, as before). The file's position
    is kept. Files larger than 4 bytes per pixel + 1 MiB (mostly not image data) are left to Pillow, which
    reads only what it decodes, so that a hostile file's tail is never read into memory."""
    decode = fast_decode.decoders().get(image.format)
    if decode is None or image.mode not in ("RGB", "L"):
        return None
    handle, (width, height) = image.fp, image.size
    bound = 4 * width * height + (1 << 20)
    position = handle.tell()
    try:
        handle.seek(0)
        data = handle.read(bound + 1)
        if len(data) > bound:
            return None
        if image.format == "PNG":
            if not fast_decode.png_eligible(data):
                return None
            orientation = image.getexif().get(0x0112) if "exif" in image.info else None  # see upright_size
        else:
            orientation = image.getexif().get(0x0112)
        pixels = decode(data, height, width)
        return fast_decode.orient(pixels, orientation if isinstance(orientation, int) else None)
    except Exception:  # the fast path refused: Pillow decides
        return None
    finally:
        handle.seek(position)


def read_image(path: str | Path, *, check: SizeCheck | None = None) -> np.ndarray:
    """Decode one file -> (H, W, 3) uint8, or raise ImageReadError naming it.

    The header's size is checked against MAX_PIXELS and MAX_ASPECT_RATIO before decoding; `check(H, W)`
    (e.g. Preprocess.check_size) runs on the upright size and its InputError becomes this file's error."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    try:
        with open_image(path) as image:
            check_limits(image.height, image.width)
            pixels = _fast_pixels(image)
            if pixels is None:
                image.load()  # decode now: truncated files fail here, not later; the first frame only
                check_complete(path, image)
                pixels = to_rgb_uint8(_upright(image))
    except ConfigError:
        raise
    except Exception as err:  # whatever a decoder raises on a hostile file is that file's error
        raise read_error(path, err) from None
    if check is not None:
        try:
            check(pixels.shape[0], pixels.shape[1])
        except InputError as err:
            raise ImageReadError(path, str(err)) from None
    return pixels


def estimated_bytes(path: str | Path) -> int:
    """Decoded size (3 bytes per pixel) from the file's header; 0 when there is no readable header (the
    decoder then reports the file)."""
    try:
        with open_image(path) as image:
            width, height = image.size
    except Exception:  # read_image gives the precise error later
        return 0
    return 3 * width * height if width * height <= limit("MAX_PIXELS", MAX_PIXELS) else 0  # beyond: refused unread


def as_uint8_tensor(image: np.ndarray | Image.Image | torch.Tensor) -> torch.Tensor:
    """One in-memory image -> (3, H, W) uint8 tensor. Arrays are (H, W) or (H, W, C).

    PIL images are turned upright by their EXIF orientation, as files are; arrays and tensors have none."""
    import torch  # here, not at the top: the torch-free runtime (patchcore.runtime) decodes with this module

    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"image tensors must be (3, H, W), got {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise InputError(f"image tensors must be uint8, got {image.dtype}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise InputError(f"empty image tensor {tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"empty PIL image ({image.width} x {image.height})")
        image = to_rgb_uint8(_upright(image))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"image arrays must be (H, W), (H, W, 1|3|4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"empty image array {arr.shape}")
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 or uint16, got {arr.dtype}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:  # transparent areas black, exactly as for an RGBA file or PIL image
        arr = to_rgb_uint8(Image.fromarray(np.ascontiguousarray(arr), "RGBA"))
    return torch.from_numpy(np.array(arr, copy=True, order="C")).permute(2, 0, 1)


@dataclass
class LoadedBatch:
    paths: list[Path]
    images: list[torch.Tensor]  # (3, H, W) uint8 each (as_tensors=False: (H, W, 3) uint8 arrays)
    failures: list[ImageReadError]
    prepared: list = field(default_factory=list)  # with prepare=: prepare(image) of each image, in order


def iter_image_batches(paths: Sequence[str | Path], batch_size: int, *, workers: int = 2,
                       check: SizeCheck | None = None, as_tensors: bool = True,
                       prepare: Callable[[np.ndarray], object] | None = None,
                       keep_decoded: bool = True) -> Iterator[LoadedBatch]:
    """Decode files in background threads (PIL releases the GIL while decoding) and yield batches.

    Unreadable files do not stop the stream: they come back in `failures`, each naming its file, and so do
    files that `check(H, W)` refuses (see read_image). Read-ahead is bounded in files (2 batches) and in
    decoded bytes (READAHEAD_BYTES, estimated from each header; one file always goes ahead).
    as_tensors=False: the images as read_image's (H, W, 3) uint8 arrays (the torch-free runtime).
    prepare: run on each decoded (H, W, 3) array in the same background thread (the runtime's resize to the
    model input: Pillow releases the GIL there too, so it overlaps the model instead of following it); the
    results in `batch.prepared`, or with keep_decoded=False in `batch.images`, the decoded image dropped in its
    thread (a caller that needs only the prepared image holds a batch of those, not of full decoded images).
    """

    def load(path: str | Path) -> tuple | ImageReadError:
        try:
            pixels = read_image(path, check=check)
        except ImageReadError as err:
            return err
        if prepare is not None and not keep_decoded:
            return prepare(pixels), None
        return (as_uint8_tensor(pixels) if as_tensors else pixels), (None if prepare is None else prepare(pixels))

    prefetch = max(2 * batch_size, 4)
    budget = limit("READAHEAD_BYTES", READAHEAD_BYTES)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()  # (path, estimated bytes, future), in input order
        ahead = 0  # estimated bytes of the pending files
        remaining = iter(paths)
        upcoming = None  # (path, estimated bytes) not yet submitted for want of budget
        batch = LoadedBatch([], [], [])
        while True:
            while len(pending) < prefetch:
                if upcoming is None:
                    path = next(remaining, None)
                    if path is None:
                        break
                    upcoming = (path, estimated_bytes(path))
                if pending and ahead + upcoming[1] > budget:
                    break
                path, size = upcoming
                upcoming = None
                pending.append((path, size, pool.submit(load, path)))
                ahead += size
            if not pending:
                break
            path, size, future = pending.popleft()
            result = future.result()
            ahead -= size
            if isinstance(result, ImageReadError):
                batch.failures.append(result)
            else:
                batch.paths.append(Path(path))
                batch.images.append(result[0])
                if prepare is not None and keep_decoded:
                    batch.prepared.append(result[1])
            if len(batch.images) == batch_size:
                yield batch
                batch = LoadedBatch([], [], [])
        if batch.images or batch.failures:
            yield batch
