"""Faster decoders for the common files, each giving exactly Pillow's pixels (issue 17 point 6).

8-bit RGB and grey PNG: libspng (the library the `pyspng` wheel ships), its image data inflated by zlib-ng
where the `zlib-ng` wheel is installed (`_stored_idat`); JPEG in RGB or grey: libjpeg-turbo through
`simplejpeg`. Both ~2-4x faster than Pillow on these files (docs/RUNTIME.md, "Decoders"), both release the GIL
while decoding (so decoding threads overlap the model), both optional: without them, or for any other file,
io/images.py decodes with Pillow as before.

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
        lib.spng_set_png_buffer.argtypes = [void, void, ctypes.c_size_t]
        lib.spng_set_chunk_limits.argtypes = [void, ctypes.c_size_t, ctypes.c_size_t]
        lib.spng_set_image_limits.argtypes = [void, ctypes.c_uint32, ctypes.c_uint32]
        lib.spng_get_ihdr.argtypes = [void, ctypes.POINTER(_Ihdr)]
        lib.spng_set_crc_action.argtypes = [void, ctypes.c_int, ctypes.c_int]
        lib.spng_decode_image.argtypes = [void, void, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
        lib.spng_strerror.restype, lib.spng_strerror.argtypes = ctypes.c_char_p, [ctypes.c_int]
        lib.formats = {0: int(_pyspng_c.SPNG_FMT_G8), 2: int(_pyspng_c.SPNG_FMT_RGB8)}
        return lib
    except (ImportError, OSError, AttributeError, TypeError):
        return None


@functools.cache
def _decompressobj():
    """zlib_ng.decompressobj (the `zlib-ng` wheel), or None: PNGs are then inflated by libspng's own zlib."""
    try:
        from zlib_ng import zlib_ng
        return zlib_ng.decompressobj
    except ImportError:
        return None


# Why PNG image data is inflated here and not by libspng (docs/RUNTIME.md, "Decoders", 2026-12-05): libspng's
# bundled zlib is classic zlib 1.2, which spends 6.0 of libspng's ~9-10.5 ms CPU on a bottle PNG (900 x 900
# RGB, 0.53 MB) inflating; zlib-ng inflates the same stream in 2.8 ms. libspng 0.7 cannot be handed inflated
# rows, so they go back into the file as zlib *stored* blocks (a 5-byte header per 65,535 bytes, no
# compression), which its zlib only copies: 3.0 ms for libspng's unfiltering, ~6 ms in all, same pixels.
_STORED_BLOCK = 65535
_INFLATE_STEP = 1 << 20  # compressed bytes per call: pieces of a few MB, which the heap reuses
_SPNG_CTX_IGNORE_ADLER32, _SPNG_CRC_USE, _SPNG_CRC_ERROR = 1, 2, 0


def _stored_idat(data: bytes, height: int, width: int) -> np.ndarray | None:
    """`data` (as uint8) with its IDAT chunks replaced by one IDAT of the inflated image data in stored blocks (its
    Adler-32 and CRC left zero), or None where anything is unusual: not 8-bit RGB/grey, non-standard
    compression/filter method, interlaced, chunks cut short, a zlib stream that is corrupt or whose checksum
    fails, that does not end in the first run of IDAT chunks, that has bytes after its end, or whose length
    is not one filter byte + one row for each row. Then the file goes to libspng as it is (and Pillow after),
    so that every odd file keeps the verdict it had. Never inflates more than the expected size + 1 byte."""
    channels = {0: 1, 2: 3}.get(data[25])
    if channels is None or data[24] != 8 or data[26:29] != b"\0\0\0":
        return None
    pos, start, bodies = 8, 0, []
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if pos + 12 + length > len(data):
            return None
        if kind == b"IDAT":
            start = start or pos
            bodies.append(memoryview(data)[pos + 8:pos + 8 + length])
        elif start:
            break  # the zlib stream must end in the first run of IDAT chunks
        pos += 12 + length
    expected = height * (1 + width * channels)
    full, rest = divmod(expected, _STORED_BLOCK)
    stream_length = 2 + 5 * (full + (rest > 0)) + expected + 4  # the zlib stream of stored blocks
    if not start or stream_length > 0x7FFFFFFF:
        return None  # no image data, or more than one PNG chunk can hold
    # the copy of `data` libspng will read, the inflated rows written into it as they come (numpy's copies release
    # the GIL; bytes.join holds it, 40 ms for 60 MB), so that no array of the whole image data is made: at
    # 20 Mpx, where every buffer over 32 MB is mapped afresh by glibc, that took the gain back (step 78 -> 46 ms)
    head, tail = np.frombuffer(data, np.uint8, start), np.frombuffer(data, np.uint8, offset=pos)
    out = np.empty(len(head) + 8 + stream_length + 4 + len(tail), np.uint8)
    out[:len(head)] = head
    at = len(head) + 10  # after the chunk's length and type and the zlib header (deflate, 32 KiB window)
    out[len(head):at] = np.frombuffer(stream_length.to_bytes(4, "big") + b"IDAT\x78\x01", np.uint8)
    step = 5 + _STORED_BLOCK  # each block: final bit, LEN and NLEN (little-endian), its bytes
    blocks = out[at:at + full * step].reshape(full, step)
    blocks[:, :5] = (0, 255, 255, 0, 0)
    if rest:
        out[at + full * step:at + full * step + 5] = (1, rest & 255, rest >> 8, ~rest & 255, ~rest >> 8 & 255)
    else:
        blocks[-1, 0] = 1  # the last full block is the final one
    inflater, got = _decompressobj()(), 0
    compressed = bodies[0] if len(bodies) == 1 else np.concatenate([np.frombuffer(b, np.uint8) for b in bodies])
    try:
        for begin in range(0, len(compressed), _INFLATE_STEP):
            if inflater.eof:
                return None  # bytes after the end of the stream
            piece = inflater.decompress(compressed[begin:begin + _INFLATE_STEP], expected + 1 - got)
            if got + len(piece) > expected:
                return None
            done = 0
            while done < len(piece):  # into the blocks it spans
                block, offset = divmod(got, _STORED_BLOCK)
                size = min(_STORED_BLOCK - offset, len(piece) - done)
                where = at + block * step + 5 + offset
                out[where:where + size] = np.frombuffer(piece, np.uint8, size, done)
                done, got = done + size, got + size
    except Exception:  # zlib_ng.error: corrupt data, a wrong Adler-32
        return None
    if not inflater.eof or inflater.unused_data or got != expected:
        return None
    end = at + full * step + (5 + rest if rest else 0)
    out[end:end + 8] = 0  # Adler-32 and CRC, not checked (zlib_ng checked the original's Adler-32)
    out[end + 8:] = tail
    return out


def _decode_png(data: bytes, height: int, width: int) -> np.ndarray:
    """libspng on the image data inflated by zlib-ng (`_stored_idat`), or on `data` as it is where that is
    not installed or refuses or libspng refuses what it made."""
    stored = _stored_idat(data, height, width) if _decompressobj() is not None and len(data) >= 33 else None
    if stored is not None:
        try:
            return _spng_decode(stored, height, width, inflated=True)
        except ValueError:
            pass  # e.g. a bad filter byte: libspng decides on the file as it came
    return _spng_decode(data, height, width, inflated=False)


def _spng_decode(data: bytes | np.ndarray, height: int, width: int, *, inflated: bool) -> np.ndarray:
    """(H, W, 3) uint8 by libspng, or ValueError. `inflated`: `data` is _stored_idat's, whose IDAT CRC and
    Adler-32 are zero (Pillow does not check an IDAT CRC either; zlib_ng checked the Adler-32); CRCs of
    ancillary chunks are checked as before, those of the other critical chunks Pillow's open has checked."""
    lib = _libspng()
    ctx = lib.spng_ctx_new(_SPNG_CTX_IGNORE_ADLER32 if inflated else 0)
    if not ctx:
        raise MemoryError("spng_ctx_new")
    try:
        def call(result: int) -> None:
            if result:
                raise ValueError(f"libspng: {lib.spng_strerror(result).decode()}")

        if inflated:
            call(lib.spng_set_crc_action(ctx, _SPNG_CRC_USE, _SPNG_CRC_ERROR))
        call(lib.spng_set_image_limits(ctx, width, height))  # the header PIL read and io/images.py checked
        call(lib.spng_set_chunk_limits(ctx, 1 << 26, 1 << 26))  # ancillary chunk memory (pyspng's value)
        buffer = np.frombuffer(data, np.uint8)  # kept alive until the context is freed
        call(lib.spng_set_png_buffer(ctx, buffer.ctypes.data, buffer.nbytes))
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
