"""Faster decoders for the common files, each giving exactly Pillow's pixels (issue 17 point 6).

8-bit RGB and grey PNG: libspng (the library the `pyspng` wheel ships); JPEG in RGB or grey: libjpeg-turbo
through `simplejpeg`. Both ~2-4x faster than Pillow on these files (docs/RUNTIME.md, "Decoders"), both
release the GIL while decoding (so decoding threads overlap the model), both optional: without them, or
for any other file, io/images.py decodes with Pillow as before.

Only files these decoders turn into the same pixels as Pillow's path are given to them (`png_eligible`,
`jpeg_eligible`); the limits, EXIF orientation and every refusal stay in io/images.py. A fast decoder that
raises is not an answer: the file goes to Pillow, whose verdict (pixels or ImageReadError) is the one
read_image has always given. Tests: tests/test_fast_decode.py (pixels identical to Pillow's, the hostile
corpus and the fuzzer with the fast decoders on).
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np

Decoder = Callable[[bytes, int, int], np.ndarray]  # (file bytes, height, width) -> (H, W, 3) uint8

# ImageOps.exif_transpose's transposes as array views of (H, W, C): EXIF orientation -> same pixels.
_ORIENT = {
    2: lambda a: a[:, ::-1],                      # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],                   # ROTATE_180
    4: lambda a: a[::-1],                         # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),            # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],   # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],      # ROTATE_90 (counter-clockwise)
}


def orient(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """(H, W, 3) turned as EXIF orientation 2-8 says, pixel for pixel as ImageOps.exif_transpose; C order."""
    turn = _ORIENT.get(orientation)
    return pixels if turn is None else np.ascontiguousarray(turn(pixels))


def png_eligible(data: bytes) -> bool:
    """True for a single-image, 8-bit grey or RGB PNG without transparency whose EXIF orientation, if any,
    PIL's open has already read: an eXIf chunk before the image data. Pillow also takes an orientation from
    an eXIf chunk after the image data, from ImageMagick's "Raw profile type exif" text and from XMP's
    tiff:Orientation, but only after decoding the whole file: files that have one of those (or compressed
    XMP, which cannot be searched here) go to Pillow. XMP without tiff:Orientation, as in MVTec AD's PNGs,
    changes nothing. Pillow ignores gamma, ICC and sBIT in these files, and so does libspng without its
    gamma flag."""
    if len(data) < 33 or data[12:16] != b"IHDR" or data[24] != 8 or data[25] not in (0, 2):
        return False
    pos, seen_idat = 8, False
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind in (b"tRNS", b"acTL", b"fcTL") or (kind == b"eXIf" and seen_idat):
            return False
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            if body.startswith(b"Raw profile type exif\0"):
                return False
            if body.startswith(b"XML:com.adobe.xmp\0") and (
                    kind == b"zTXt" or (kind == b"iTXt" and body[18:19] != b"\0") or b"tiff:Orientation" in body):
                return False
        if kind == b"IEND":
            break
        seen_idat = seen_idat or kind == b"IDAT"
        pos += 12 + length
    return seen_idat


class _Ihdr(ctypes.Structure):  # struct spng_ihdr (libspng 0.7)
    _fields_ = [("width", ctypes.c_uint32), ("height", ctypes.c_uint32), ("bit_depth", ctypes.c_uint8),
                ("color_type", ctypes.c_uint8), ("compression_method", ctypes.c_uint8),
                ("filter_method", ctypes.c_uint8), ("interlace_method", ctypes.c_uint8)]


@functools.cache
def _libspng():
    """libspng 0.7 from the pyspng wheel through ctypes, or None. Not pyspng.load: its binding holds the GIL
    for the whole decode (measured: a 1 ms sleep in another thread waited 12.6 ms, median), which would stall
    the model's thread for every file decoded beside it; ctypes calls release the GIL."""
    try:
        from pyspng import _pyspng_c
        lib = ctypes.CDLL(_pyspng_c.__file__)
        lib.spng_version_string.restype = ctypes.c_char_p
        if not lib.spng_version_string().startswith(b"0.7."):
            return None
        void = ctypes.c_void_p
        lib.spng_ctx_new.restype, lib.spng_ctx_new.argtypes = void, [ctypes.c_int]
        lib.spng_ctx_free.restype, lib.spng_ctx_free.argtypes = None, [void]
        lib.spng_set_png_buffer.argtypes = [void, ctypes.c_char_p, ctypes.c_size_t]
        lib.spng_set_chunk_limits.argtypes = [void, ctypes.c_size_t, ctypes.c_size_t]
        lib.spng_set_image_limits.argtypes = [void, ctypes.c_uint32, ctypes.c_uint32]
        lib.spng_get_ihdr.argtypes = [void, ctypes.POINTER(_Ihdr)]
        lib.spng_decode_image.argtypes = [void, void, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        lib.spng_strerror.restype, lib.spng_strerror.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.formats = {0: int(_pyspng_c.SPNG_FMT_G8), 2: int(_pyspng_c.SPNG_FMT_RGB8)}
        return lib
    except (ImportError, OSError, AttributeError, TypeError):
        return None


def _decode_png(data: bytes, height: int, width: int) -> np.ndarray:
    lib = _libspng()
    ctx = lib.spng_ctx_new(0)
    if not ctx:
        raise MemoryError("spng_ctx_new")
    try:
        def call(result: int) -> None:
            if result:
                raise ValueError(f"libspng: {lib.spng_strerror(result).decode()}")

        call(lib.spng_set_image_limits(ctx, width, height))  # the header PIL read and io/images.py checked
        call(lib.spng_set_chunk_limits(ctx, 1 << 26, 1 << 26))  # ancillary chunk memory (pyspng's value)
        call(lib.spng_set_png_buffer(ctx, data, len(data)))
        ihdr = _Ihdr()
        call(lib.spng_get_ihdr(ctx, ctypes.byref(ihdr)))
        if (ihdr.height, ihdr.width, ihdr.bit_depth) != (height, width, 8) or ihdr.color_type not in lib.formats:
            raise ValueError("PNG header differs from the one checked")
        grey = ihdr.color_type == 0
        out = np.empty((height, width) if grey else (height, width, 3), np.uint8)
        call(lib.spng_decode_image(ctx, out.ctypes.data, out.nbytes, lib.formats[ihdr.color_type], 0))
    finally:
        lib.spng_ctx_free(ctx)
    return np.repeat(out[..., None], 3, axis=2) if grey else out  # grey -> RGB as PIL's convert("RGB")


def _decode_jpeg(data: bytes, height: int, width: int) -> np.ndarray:
    import simplejpeg

    # strict: libjpeg-turbo's warnings (corrupt or missing data, which it would fill in) are errors, and the
    # file goes to Pillow. Accurate integer IDCT and smooth upsampling: Pillow's settings (bit-identical).
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    if pixels.shape != (height, width, 3):
        raise ValueError(f"JPEG decoded to {pixels.shape}, header says {height} x {width}")
    return pixels


@functools.cache
def decoders() -> dict[str, Decoder]:
    """The fast decoders installed here, by PIL format name ("PNG", "JPEG")."""
    found: dict[str, Decoder] = {}
    if _libspng() is not None:
        found["PNG"] = _decode_png
    try:
        import simplejpeg  # noqa: F401
        found["JPEG"] = _decode_jpeg
    except ImportError:
        pass
    return found
