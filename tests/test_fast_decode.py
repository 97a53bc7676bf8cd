"""The fast decoders (io/fast_decode.py: libspng for 8-bit RGB/grey PNG, libjpeg-turbo via simplejpeg for
JPEG) give read_image exactly the pixels and verdicts of the Pillow-only path, and take the files they should."""
from __future__ import annotations

import io
import random
import struct
import zlib

import hostile
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from patchcore.errors import ImageReadError
from patchcore.io import fast_decode, images


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Texture with sharp edges and noise: a JPEG's IDCT and chroma upsampling both matter on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, ((x // 4 + y // 4) % 2) * 200], axis=-1)
    return np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def interlaced_png(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (PIL cannot write one)."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y, x0::dx].tobytes() for x0, y0, dx, dy in images._ADAM7
                    for y in range(y0, h, dy) if x0 < w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (hostile.PNG_SIGNATURE + hostile.chunk(b"IHDR", header) + hostile.chunk(b"IDAT", zlib.compress(rows))
            + hostile.chunk(b"IEND", b""))


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


def png_exif_after_idat(rgb: np.ndarray, orientation: int) -> bytes:
    data = save(Image.fromarray(rgb), "PNG")
    end = data.rindex(b"IEND") - 4
    return data[:end] + hostile.chunk(b"eXIf", exif(orientation)[6:]) + data[end:]  # without "Exif\0\0"


def xmp_packet(orientation: int | None) -> str:
    """An XMP packet with tiff:Orientation (Pillow's getexif reads it when EXIF has none), or without it."""
    tag = "" if orientation is None else f'tiff:Orientation="{orientation}"'
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" {tag}/></rdf:RDF></x:xmpmeta>')


def xmp(orientation: int | None, *, compressed: bool = False) -> PngInfo:
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp_packet(orientation), zip=compressed)
    return info


def raw_profile_exif(orientation: int) -> PngInfo:
    """EXIF as ImageMagick stores it in PNG text ("Raw profile type exif": hex after a length line)."""
    data = exif(orientation)
    info = PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(data):8d}\n{data.hex()}")
    return info


def rgb16_png(rgb: np.ndarray) -> bytes:
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + (rgb[y].astype(">u2") * 257).tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (hostile.PNG_SIGNATURE + hostile.chunk(b"IHDR", header) + hostile.chunk(b"IDAT", zlib.compress(rows))
            + hostile.chunk(b"IEND", b""))


SIZES = [(1, 1), (1, 2), (2, 1), (3, 5), (17, 33), (64, 48), (31, 257)]


def cases() -> list[tuple[str, bytes, bool]]:
    """(name, file, taken by a fast decoder)."""
    out = []
    for h, w in SIZES:
        rgb = picture(h, w, h * w)
        out += [(f"png-rgb-{h}x{w}", save(Image.fromarray(rgb), "PNG"), True),
                (f"png-grey-{h}x{w}", save(Image.fromarray(rgb[..., 0]), "PNG"), True),
                (f"png-interlaced-{h}x{w}", interlaced_png(rgb), True)]
        for sub in (0, 1, 2):
            jpeg = save(Image.fromarray(rgb), "JPEG", quality=90, subsampling=sub)
            out.append((f"jpeg-{h}x{w}-sub{sub}", jpeg, True))
        out.append((f"jpeg-grey-{h}x{w}", save(Image.fromarray(rgb[..., 1]), "JPEG", quality=80), True))
    rgb = picture(45, 70, 7)
    gamma = PngInfo()
    gamma.add(b"gAMA", struct.pack(">I", 45455))
    rgba = np.dstack([rgb, (np.arange(70)[None, :] * 3 % 256).repeat(45, 0).astype(np.uint8)])
    out += [
        ("png-gamma", save(Image.fromarray(rgb), "PNG", pnginfo=gamma), True),
        ("png-optimised", save(Image.fromarray(rgb), "PNG", optimize=True), True),
        ("png-level0", save(Image.fromarray(rgb), "PNG", compress_level=0), True),
        ("png-16bit-grey", save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"), False),
        ("png-16bit-rgb", rgb16_png(rgb), False),
        ("png-palette", save(Image.fromarray(rgb).quantize(37), "PNG"), False),
        ("png-palette-transparent", save(Image.fromarray(rgb).quantize(16), "PNG", transparency=3), False),
        ("png-rgb-transparent", save(Image.fromarray(rgb), "PNG", transparency=(12, 34, 56)), False),
        ("png-grey-transparent", save(Image.fromarray(rgb[..., 0]), "PNG", transparency=9), False),
        ("png-grey-alpha", save(Image.fromarray(rgba[..., [0, 3]]), "PNG"), False),
        ("png-rgba", save(Image.fromarray(rgba), "PNG"), False),
        ("png-1bit", save(Image.fromarray(rgb[..., 0] > 128), "PNG"), False),
        ("jpeg-progressive", save(Image.fromarray(rgb), "JPEG", quality=75, progressive=True), True),
        ("jpeg-optimised", save(Image.fromarray(rgb), "JPEG", quality=60, optimize=True), True),
        ("jpeg-q100", save(Image.fromarray(rgb), "JPEG", quality=100), True),
        ("jpeg-restarts", save(Image.fromarray(rgb), "JPEG", quality=85, restart_marker_rows=1), True),
        ("jpeg-stored-as-rgb", save(Image.fromarray(rgb), "JPEG", quality=90, keep_rgb=True), True),  # Adobe, no YCbCr
        ("jpeg-cmyk", save(Image.fromarray(rgb).convert("CMYK"), "JPEG"), False),
        ("png-exif-after-idat", png_exif_after_idat(rgb, 6), False),
        ("png-xmp-orientation", save(Image.fromarray(rgb), "PNG", pnginfo=xmp(6)), False),
        ("png-xmp-without-orientation", save(Image.fromarray(rgb), "PNG", pnginfo=xmp(None)), True),  # MVTec AD's
        ("png-xmp-compressed", save(Image.fromarray(rgb), "PNG", pnginfo=xmp(6, compressed=True)), False),
        ("png-imagemagick-exif", save(Image.fromarray(rgb), "PNG", pnginfo=raw_profile_exif(6)), False),
        ("jpeg-xmp-orientation", save(Image.fromarray(rgb), "JPEG", xmp=xmp_packet(8).encode()), True),
        ("tiff", save(Image.fromarray(rgb), "TIFF"), False),
    ]
    for orientation in range(1, 9):
        out += [(f"jpeg-exif-{orientation}", save(Image.fromarray(rgb), "JPEG", exif=exif(orientation)), True),
                (f"png-exif-{orientation}", save(Image.fromarray(rgb), "PNG", exif=exif(orientation)), True)]
    return out


INSTALLED = fast_decode.decoders  # before any test patches it


@pytest.fixture
def pillow_only(monkeypatch):
    def use(on: bool) -> None:
        monkeypatch.setattr(fast_decode, "decoders", INSTALLED if on else dict)
    return use


def spying(made: list, label: str):
    """fast_decode.decoders with each decoder appending `label` to `made` when it succeeds."""
    def wrap(decode):
        def spy(*args):
            pixels = decode(*args)
            made.append(label)
            return pixels
        return spy
    found = {fmt: wrap(decode) for fmt, decode in INSTALLED().items()}
    return lambda: found


def test_the_fast_decoders_are_installed():
    # pyspng and simplejpeg are dependencies: without them the tests below would compare Pillow with itself
    assert set(INSTALLED()) == {"PNG", "JPEG"}


def test_pixels_are_identical_to_pillows_and_the_right_files_take_the_fast_path(tmp_path, monkeypatch):
    made = []
    for name, data, fast in cases():
        path = tmp_path / name
        path.write_bytes(data)
        monkeypatch.setattr(fast_decode, "decoders", dict)
        expected = images.read_image(path)
        monkeypatch.setattr(fast_decode, "decoders", spying(made, name))
        got = images.read_image(path)
        assert got.dtype == np.uint8 and got.flags.c_contiguous, name
        assert got.shape == expected.shape and np.array_equal(got, expected), name
        assert (name in made) == fast, name


def test_exif_orientation_turns_as_pillow_does():
    rgb = picture(5, 9)
    for orientation in range(1, 9):
        image = Image.fromarray(rgb)
        image.info["exif"] = exif(orientation)
        image.getexif()[0x0112] = orientation
        expected = np.asarray(images.ImageOps.exif_transpose(image))
        assert np.array_equal(fast_decode.orient(rgb, orientation), expected), orientation


def test_hostile_files_get_the_same_errors(tmp_path, pillow_only, monkeypatch):
    # a bomb just over MAX_PIXELS (8193 x 8193) is made 3x faster than tests/hostile.py's 15000 x 15000
    monkeypatch.setattr(hostile, "bomb_png", lambda side=8193, make=hostile.bomb_png: make(side))
    for name, data in hostile.hostile_files().items():
        path = tmp_path / name
        path.write_bytes(data)
        messages = []
        for on in (False, True):
            pillow_only(on)
            with pytest.raises(ImageReadError) as err:
                images.read_image(path)
            messages.append(str(err.value))
        assert messages[0] == messages[1], name


def test_fuzzed_files_get_the_same_verdict_and_pixels(tmp_path, pillow_only):
    rng, seeds, outcomes = random.Random(17), hostile.fuzz_seeds(), set()
    for i in range(300):
        source = seeds[i % len(seeds)]
        path = tmp_path / ("case.png" if source[:8] == hostile.PNG_SIGNATURE else "case.jpg")
        path.write_bytes(hostile.mutate(source, rng))
        outcomes.add(same_as_pillow(path, pillow_only))
    assert outcomes == {"refused", "pixels"}


def test_a_file_with_a_long_tail_is_left_to_pillow(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fast_decode, "decoders", spying(calls, "png"))
    data = save(Image.fromarray(picture(20, 20)), "PNG")
    path = tmp_path / "tail.png"
    path.write_bytes(data + bytes(4 * 400 + (1 << 20) + 1))  # past IEND: Pillow never reads it
    assert images.read_image(path).shape == (20, 20, 3)
    assert calls == []
    path.write_bytes(data)
    images.read_image(path)
    assert len(calls) == 1


def test_libspng_is_called_without_the_gil():
    # pyspng.load holds the GIL for a whole decode (a model thread beside it would wait that long for each
    # file: benchmarks/decode_candidates.py measures it); a ctypes.CDLL call releases it (a PyDLL would not).
    import ctypes

    lib = fast_decode._libspng()
    assert isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)
    assert not lib._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI


# PNG image data inflated by zlib-ng and handed to libspng as stored blocks (fast_decode._stored_idat)

def filtered_rows(pixels: np.ndarray, filters: list[int]) -> bytes:
    """The scanlines of (H, W) or (H, W, 3) uint8 `pixels`, row y filtered with filters[y] (PNG 0-4)."""
    h = pixels.shape[0]
    x = pixels.reshape(h, -1).astype(np.int16)
    bpp = 1 if pixels.ndim == 2 else 3
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]  # left
    b = np.zeros_like(x)
    b[1:] = x[:-1]  # up
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]  # up-left
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    by_filter = [x, x - a, x - b, x - (a + b) // 2, x - paeth]
    return b"".join(bytes([f]) + (by_filter[f][y] & 255).astype(np.uint8).tobytes() for y, f in enumerate(filters))


def png_with(pixels: np.ndarray, rows: bytes, *, pieces: int = 1, stream: bytes | None = None,
             between: bytes = b"") -> bytes:
    """An 8-bit grey/RGB PNG of `rows` (zlib level 9, or `stream` as given) in `pieces` IDAT chunks, with
    `between` (whole chunks) after the first one."""
    h, w = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    stream = zlib.compress(rows, 9) if stream is None else stream
    cuts = [len(stream) * i // pieces for i in range(pieces + 1)]
    idats = [hostile.chunk(b"IDAT", stream[cuts[i]:cuts[i + 1]]) for i in range(pieces)]
    return (hostile.PNG_SIGNATURE + hostile.chunk(b"IHDR", header) + idats[0] + between + b"".join(idats[1:])
            + hostile.chunk(b"IEND", b""))


@pytest.fixture
def paths_taken(monkeypatch):
    """The libspng decodes that succeeded, as "inflated" (zlib-ng's path) or "as is" (the file as it came)."""
    taken, decode = [], fast_decode._spng_decode

    def spy(data, height, width, *, inflated):
        pixels = decode(data, height, width, inflated=inflated)
        taken.append("inflated" if inflated else "as is")
        return pixels
    monkeypatch.setattr(fast_decode, "_spng_decode", spy)
    return taken


def same_as_pillow(path, pillow_only) -> str:
    """read_image's verdict with the fast decoders equals the Pillow-only one: "pixels" or "refused"."""
    results = []
    for on in (False, True):
        pillow_only(on)
        try:
            results.append(images.read_image(path))
        except ImageReadError as err:
            results.append(str(err))
    if isinstance(results[0], str) or isinstance(results[1], str):
        assert results[0] == results[1]
        return "refused"
    assert results[1].dtype == np.uint8 and np.array_equal(results[0], results[1])
    return "pixels"


def test_zlib_ng_is_installed():
    # a dependency: without it every PNG would take libspng's own (slower) inflate and the tests below would fail
    assert fast_decode._decompressobj() is not None


def test_every_filter_type_and_size_decodes_through_zlib_ng_as_pillow_does(tmp_path, pillow_only, paths_taken):
    rng = np.random.default_rng(5)
    for h, w in SIZES:
        for grey in (False, True):
            pixels = picture(h, w, h + w)[..., 0] if grey else picture(h, w, h + w)
            for kind in ("0", "1", "2", "3", "4", "mixed"):
                filters = list(rng.integers(0, 5, h)) if kind == "mixed" else [int(kind)] * h
                for pieces in (1, 3):
                    name = f"{h}x{w}-{'grey' if grey else 'rgb'}-filter{kind}-idat{pieces}"
                    path = tmp_path / f"{name}.png"
                    path.write_bytes(png_with(pixels, filtered_rows(pixels, filters), pieces=pieces))
                    paths_taken.clear()
                    assert same_as_pillow(path, pillow_only) == "pixels", name
                    assert paths_taken == ["inflated"], name  # not a silent fall-back to the old path
                    expected = np.repeat(pixels[..., None], 3, axis=2) if grey else pixels
                    assert np.array_equal(images.read_image(path), expected), name


@pytest.mark.parametrize("step", [None, 97])  # the step of compressed bytes per call to zlib_ng: as set, or tiny
def test_odd_image_data_keeps_pillows_verdict(tmp_path, pillow_only, paths_taken, monkeypatch, step):
    if step:
        monkeypatch.setattr(fast_decode, "_INFLATE_STEP", step)
    pixels = picture(23, 41, 3)
    rows = filtered_rows(pixels, [4, 1, 2, 3, 0] * 4 + [4, 4, 4])
    good = zlib.compress(rows, 9)
    stride = 1 + 41 * 3
    bad_filter = bytearray(rows)
    bad_filter[5 * stride] = 5
    bad_crc = bytearray(png_with(pixels, rows))
    idat = bad_crc.index(b"IDAT")
    bad_crc[idat + 4 + int.from_bytes(bad_crc[idat - 4:idat], "big")] ^= 1
    text = hostile.chunk(b"tEXt", b"Comment\0between the image data")
    cases = {  # name: (file, the path that gives the verdict)
        "idat-crc-wrong": (bytes(bad_crc), "inflated"),  # Pillow does not check an IDAT CRC, libspng does
        "many-small-idat": (png_with(pixels, rows, pieces=len(good)), "inflated"),
        "empty-idat-between": (png_with(pixels, rows, pieces=2, between=hostile.chunk(b"IDAT", b"")), "inflated"),
        "stream-truncated": (png_with(pixels, rows, stream=good[:-40]), None),
        "stream-without-adler32": (png_with(pixels, rows, stream=good[:-4]), None),
        "adler32-wrong": (png_with(pixels, rows, stream=good[:-1] + bytes([good[-1] ^ 1])), None),
        "bytes-after-stream-end": (png_with(pixels, rows, stream=good + b"\0junk"), None),
        "raw-one-byte-short": (png_with(pixels, rows, stream=zlib.compress(rows[:-1])), None),
        "raw-one-byte-long": (png_with(pixels, rows, stream=zlib.compress(rows + b"\0")), None),
        "raw-one-row-long": (png_with(pixels, rows, stream=zlib.compress(rows + rows[:stride])), None),
        "filter-byte-5": (png_with(pixels, rows, stream=zlib.compress(bytes(bad_filter))), None),
        "not-zlib": (png_with(pixels, rows, stream=b"\x78\x9c" + bytes(60)), None),
        "raw-deflate": (png_with(pixels, rows, stream=zlib.compress(rows)[2:-4]), None),
        "chunk-between-idats": (png_with(pixels, rows, pieces=2, between=text), None),
    }
    verdicts = {}
    for name, (data, path_taken) in cases.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        paths_taken.clear()
        verdicts[name] = same_as_pillow(path, pillow_only)
        if path_taken == "inflated":
            assert paths_taken == ["inflated"], name
        else:
            assert "inflated" not in paths_taken, name  # refused: the file as it came, then Pillow
    assert set(verdicts.values()) == {"pixels", "refused"}, verdicts  # both kinds of verdict were compared


def test_inflating_stops_one_byte_past_the_expected_size(monkeypatch):
    # a decompression bomb in a small image's IDAT: 200 MB of zeros for a 4 x 4 grey image (20 bytes)
    bomb = zlib.compress(bytes(200 << 20), 9)
    data = png_with(np.zeros((4, 4), np.uint8), b"", stream=bomb)
    made, inflater = [], fast_decode._decompressobj()

    class Recording:
        def __init__(self):
            self.inner = inflater()

        def decompress(self, chunk, max_length=0):
            out = self.inner.decompress(chunk, max_length)
            made.append((max_length, len(out)))
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)
    monkeypatch.setattr(fast_decode, "_decompressobj", lambda: Recording)
    assert fast_decode._stored_idat(data, 4, 4) is None
    assert made == [(21, 21)]


def test_without_zlib_ng_pngs_still_take_libspng(tmp_path, pillow_only, paths_taken, monkeypatch):
    monkeypatch.setattr(fast_decode, "_decompressobj", lambda: None)  # as where `import zlib_ng` fails
    assert "PNG" in fast_decode.decoders()
    for grey in (False, True):
        pixels = picture(17, 33, 1)[..., 0] if grey else picture(17, 33, 1)
        path = tmp_path / f"grey{grey}.png"
        path.write_bytes(save(Image.fromarray(pixels), "PNG"))
        paths_taken.clear()
        assert same_as_pillow(path, pillow_only) == "pixels"
        assert paths_taken == ["as is"]


def test_a_missing_zlib_ng_module_is_none(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("zlib_ng"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", refuse)
    fast_decode._decompressobj.cache_clear()
    try:
        assert fast_decode._decompressobj() is None
    finally:
        monkeypatch.undo()
        fast_decode._decompressobj.cache_clear()
    assert fast_decode._decompressobj() is not None


@pytest.mark.parametrize("step", [None, 997])
def test_stored_blocks_at_their_size_limits(tmp_path, pillow_only, paths_taken, monkeypatch, step):
    # image data of exactly one and two 65,535-byte stored blocks, one block and 1 or 255 bytes, 4 blocks and
    # more; noise, whose compressed data spans more than one step of zlib_ng calls (1 MiB as set)
    if step:
        monkeypatch.setattr(fast_decode, "_INFLATE_STEP", step)
    for h, w, grey in ((257, 254, True), (514, 254, True), (771, 28, False), (256, 255, True), (258, 254, True),
                       (300, 300, False), (700, 701, False)):
        pixels = picture(h, w, w)[..., 0] if grey else picture(h, w, w)
        if h == 700:
            pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
        path = tmp_path / f"{h}x{w}.png"
        path.write_bytes(png_with(pixels, filtered_rows(pixels, [4, 3, 1] * (h // 3) + [2] * (h % 3)), pieces=2))
        paths_taken.clear()
        assert same_as_pillow(path, pillow_only) == "pixels", (h, w)
        assert paths_taken == ["inflated"], (h, w)


def fuzzed_image_data(rng: random.Random) -> bytes:
    """A small 8-bit RGB/grey PNG whose image data may be odd: random filter bytes (a few invalid), rows a few
    bytes short or long, a stream cut, extended, bit-flipped or with a wrong Adler-32, split over 1-7 IDAT
    chunks, a chunk between them, a bad IDAT CRC, no IEND."""
    h, w, channels = rng.randint(1, 40), rng.randint(1, 40), rng.choice([1, 3, 3])
    rows = bytearray()
    for _ in range(h):
        rows += bytes([rng.choice([0, 1, 2, 3, 4, 4, 4])]) + rng.randbytes(w * channels)
    odd = rng.random()
    if odd < 0.1:
        rows[rng.randrange(len(rows))] = rng.randint(0, 255)
    elif odd < 0.2:
        rows = rows[:-rng.randint(1, 5)]
    elif odd < 0.3:
        rows += bytes(rng.randint(1, 5))
    stream = bytearray(zlib.compress(bytes(rows), rng.choice([0, 1, 6, 9])))
    odd = rng.random()
    if odd < 0.1:
        stream = stream[:-rng.randint(1, 8)]
    elif odd < 0.2:
        stream += rng.randbytes(rng.randint(1, 5))
    elif odd < 0.3:
        stream[rng.randrange(len(stream))] ^= 1 << rng.randrange(8)
    elif odd < 0.35:
        stream[-rng.randint(1, 4)] ^= 1
    cuts = sorted(rng.randint(0, len(stream)) for _ in range(rng.choice([1, 1, 2, 3, 7]) - 1))
    idats = [hostile.chunk(b"IDAT", bytes(stream[a:b])) for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    if rng.random() < 0.1 and len(idats) > 1:
        idats.insert(1, hostile.chunk(b"tEXt", b"a\0b"))
    if rng.random() < 0.1:
        i = rng.randrange(len(idats))
        idats[i] = idats[i][:-1] + bytes([idats[i][-1] ^ 1])
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if channels == 1 else 2, 0, 0, 0)
    end = hostile.chunk(b"IEND", b"") if rng.random() < 0.9 else b""
    return hostile.PNG_SIGNATURE + hostile.chunk(b"IHDR", header) + b"".join(idats) + end


def test_fuzzed_image_data_keeps_pillows_verdict(tmp_path, pillow_only, paths_taken):
    # 3,000 of these agreed when this was written: pixels through zlib-ng 1,474, libspng as is 588, Pillow 21;
    # refused 917
    rng, path, outcomes = random.Random(3), tmp_path / "case.png", {}
    for i in range(1000):
        path.write_bytes(fuzzed_image_data(rng))
        paths_taken.clear()
        try:
            verdict = same_as_pillow(path, pillow_only)
        except AssertionError as err:
            raise AssertionError(f"fuzz case {i}") from err
        key = (verdict, paths_taken[-1] if paths_taken else "Pillow")
        outcomes[key] = outcomes.get(key, 0) + 1
    assert set(outcomes) >= {("pixels", "inflated"), ("pixels", "as is"), ("pixels", "Pillow"),
                             ("refused", "Pillow")}, outcomes
