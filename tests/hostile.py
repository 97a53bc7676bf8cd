"""A hostile corpus of image files, built by hand, and a seeded fuzz run of the decode path.

Used by tests/test_robustness.py and by `python tests/hostile.py fuzz --cases N --seed S` (prints one
JSON line: counts of decoded / refused files; any other exception is a failure, exit 1; a native crash
kills the process, which the caller sees as a negative return code).
"""
from __future__ import annotations

import io
import json
import random
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, scanlines: bytes, *, colour: int = 2, level: int = 6) -> bytes:
    """An 8-bit PNG from raw scanlines (each a filter byte + the row), whatever their length."""
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines, level))
            + chunk(b"IEND", b""))


def good_image(seed: int, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """A textured RGB picture (H, W, 3) uint8: smooth gradient plus noise, like a product surface."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = (np.stack([x * 3, y * 3, (x + y) * 2], axis=-1) + seed * 7) % 200
    return np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def short_idat_png(width: int = 64, height: int = 64) -> bytes:
    """Valid header and IEND, complete zlib stream, but only half the rows (torchvision's decode_png
    segfaulted on this: libpng 'Not enough image data')."""
    row = bytes(range(256)) * (3 * width // 256 + 1)
    scanlines = b"".join(b"\x00" + row[i:i + 3 * width] for i in range(height // 2))
    return png_bytes(width, height, scanlines)


def cut_idat_png(width: int = 64, height: int = 64) -> bytes:
    """The IDAT chunk holds only the start of the zlib stream (lengths and CRCs consistent)."""
    scanlines = b"".join(b"\x00" + bytes([i % 256]) * (3 * width) for i in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)[:20])
            + chunk(b"IEND", b""))


def bomb_png(side: int = 15000) -> bytes:
    """An all-zero side x side grey PNG, written with zlib level 9 (15000: ~220 kB on disk, 675 MB as RGB).
    The stream is built row by row so making it takes little memory."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    deflate = zlib.compressobj(9)
    row = bytes(1 + side)
    body = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def strip_png(width: int = 40000, height: int = 1) -> bytes:
    """A 1 x 40000 strip (a shorter-side resize to 256 would make it 256 x 10,240,000)."""
    return png_bytes(width, height, b"".join(b"\x00" + bytes(3 * width) for _ in range(height)))


def exif_rotated(array: np.ndarray, fmt: str, orientation: int = 6) -> bytes:
    """`array` stored with an EXIF orientation tag (6: the viewer turns it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def two_frame_tiff(first: np.ndarray, second: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, format="TIFF", save_all=True, append_images=[Image.fromarray(second)])
    return buffer.getvalue()


def encoded(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def hostile_files() -> dict[str, bytes]:
    """name -> content of every file that must be refused (each by a per-file error naming it)."""
    good_png = encoded(good_image(99), "PNG")
    good_jpeg = encoded(good_image(98), "JPEG", quality=90)
    return {
        "truncated.png": good_png[: len(good_png) // 2],
        "short_idat.png": short_idat_png(),
        "cut_idat.png": cut_idat_png(),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "zero_bytes.png": b"",
        "text.png": b"this is not an image, only text\n" * 4,
        "bomb.png": bomb_png(),
        "strip.png": strip_png(),
    }


# ------------------------------------------------------------------------------------ fuzzing
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flipped bytes, a cut, a spliced repeat, or (PNG) a changed chunk with a fixed CRC
    so that the decoder itself, not the CRC check, meets the damage."""
    data = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(8, len(data)):]
    elif kind == 2:
        start = rng.randrange(len(data))
        piece = data[start:start + rng.randint(1, 64)]
        at = rng.randrange(len(data))
        data[at:at] = piece * rng.randint(1, 4)
    elif kind == 3:
        pos = rng.randrange(len(data))
        data[pos:pos + 4] = struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    elif data[:8] == PNG_SIGNATURE:  # rewrite one chunk's payload, then its CRC
        chunks, pos = [], 8
        while pos + 12 <= len(data):
            length = int.from_bytes(data[pos:pos + 4], "big")
            chunks.append((pos, length))
            pos += 12 + length
        if chunks:
            pos, length = rng.choice(chunks)
            body = bytearray(data[pos + 8:pos + 8 + length])
            for _ in range(rng.randint(1, 4)):
                if body:
                    body[rng.randrange(len(body))] = rng.randrange(256)
            kind_bytes = bytes(data[pos + 4:pos + 8])
            data[pos:pos + 12 + length] = chunk(kind_bytes, bytes(body))
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def fuzz_seeds() -> list[bytes]:
    rgb, grey = good_image(1, (40, 56)), good_image(2, (33, 21))[..., 0]
    return [encoded(rgb, "PNG"), encoded(grey, "PNG"), encoded(rgb, "PNG", optimize=True),
            encoded(rgb, "JPEG", quality=85), encoded(grey, "JPEG", quality=70, progressive=True),
            exif_rotated(rgb, "JPEG")]


def fuzz(cases: int, seed: int, folder: Path) -> dict:
    from patchcore.errors import ImageReadError
    from patchcore.io.images import read_image

    rng = random.Random(seed)
    seeds = fuzz_seeds()
    counts = {"cases": cases, "seed": seed, "decoded": 0, "refused": 0}
    path_png, path_jpg = folder / "fuzz.png", folder / "fuzz.jpg"
    for i in range(cases):
        source = seeds[i % len(seeds)]
        data = mutate(source, rng)
        path = path_png if source[:8] == PNG_SIGNATURE else path_jpg
        path.write_bytes(data)
        try:
            image = read_image(path)
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            counts["decoded"] += 1
        except ImageReadError:
            counts["refused"] += 1
        except BaseException as err:
            (folder / f"failure_{i}{path.suffix}").write_bytes(data)
            raise RuntimeError(f"case {i}: {type(err).__name__}: {err}") from err
    return counts


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["fuzz"])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(fuzz(args.cases, args.seed, Path(args.folder or tmp))))
    sys.exit(0)
