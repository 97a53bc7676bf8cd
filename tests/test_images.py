"""Reading images robustly (every error names the file) and the input preprocessing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchcore.errors import ConfigError, ImageReadError, InputError
from patchcore.io.images import as_uint8_tensor, expand_inputs, header_size, iter_image_batches, list_images, read_image
from patchcore.io.preprocess import Preprocess


def _rgb(h: int = 6, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


# ---------------------------------------------------------------- decoding

def test_rgb_png(tmp_path):
    array = _rgb()
    out = read_image(_save(tmp_path / "a.png", array))
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    assert np.array_equal(out, array)


def test_grayscale_l(tmp_path):
    grey = np.array([[0, 17, 255], [128, 1, 254]], np.uint8)
    out = read_image(_save(tmp_path / "g.png", grey))
    assert out.shape == (2, 3, 3)
    assert np.array_equal(out, np.repeat(grey[..., None], 3, axis=2))


def test_rgba_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 255  # opaque row keeps its colour
    rgba[1, :, 3] = 0  # transparent row, whatever colour it holds, is black
    rgba[1, 2, 3] = 128  # half transparent: half the colour over black
    out = read_image(_save(tmp_path / "t.png", rgba))
    assert out.shape == (2, 3, 3)
    assert (out[0] == (200, 100, 50)).all()
    assert (out[1, :2] == 0).all()
    assert np.abs(out[1, 2].astype(int) - (100, 50, 25)).max() <= 1


def test_16_bit_grayscale_scaled_by_its_range(tmp_path):
    values = np.array([[0, 65535], [32896, 257], [65534, 128]], np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    path = tmp_path / "deep.png"
    image.save(path)
    out = read_image(path)
    assert out.shape == (3, 2, 3)
    expected = np.array([[0, 255], [128, 1], [255, 0]], np.uint8)  # round(v / 65535 * 255) = round(v / 257)
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_palette(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (10, 20, 30), (0, 0, 0)]
    index = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    image = Image.new("P", (3, 2))
    image.putpalette([c for rgb in colours for c in rgb])
    image.putdata(index.reshape(-1).tolist())
    path = tmp_path / "p.png"
    image.save(path)
    assert Image.open(path).mode == "P"
    out = read_image(path)
    assert np.array_equal(out, np.array(colours, np.uint8)[index])


def test_palette_with_transparent_index_is_black(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 255, 255, 40, 80, 120])
    image.putdata([0, 1])
    path = tmp_path / "pt.png"
    image.save(path, transparency=0)  # colour 0 (white) is transparent
    out = read_image(path)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [40, 80, 120]


def test_jpeg(tmp_path):
    array = np.empty((16, 24, 3), np.uint8)
    array[...] = (200, 100, 50)
    out = read_image(_save(tmp_path / "c.jpg", array, quality=95))
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - array.astype(int)).max() <= 3  # lossy, but close on a flat colour


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing", "folder"])
def test_unreadable_files_raise_image_read_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"bad_{kind}.png"
    if kind == "truncated":
        good = _save(tmp_path / "good.png", _rgb(64, 64, seed=1))
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_list_images_sorted_filtered_and_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=str(empty)):
        list_images(empty)
    with pytest.raises(InputError, match=str(tmp_path / "absent")):
        list_images(tmp_path / "absent")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "c.txt", "d.bmp"):
        (folder / name).write_bytes(b"x")
    (folder / "nested").mkdir()
    (folder / "nested" / "e.png").write_bytes(b"x")
    assert [p.name for p in list_images(folder)] == ["a.JPG", "b.png", "d.bmp"]
    assert [p.name for p in list_images(folder, recursive=True)] == ["a.JPG", "b.png", "d.bmp", "e.png"]
    single = folder / "b.png"
    assert [p.name for p in expand_inputs([single, folder])] == ["b.png", "a.JPG", "b.png", "d.bmp"]


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_iter_image_batches_skips_and_reports_bad_files(tmp_path, batch_size):
    paths, good, bad = [], [], []
    for i in range(9):
        path = tmp_path / f"{i:02d}.png"
        if i in (1, 4, 5, 8):  # bad ones in the middle, adjacent, and at the end
            path.write_bytes(b"" if i % 2 else b"not a png")
            bad.append(path)
        else:
            _save(path, _rgb(4 + i, 5, seed=i))
            good.append(path)
        paths.append(path)
    paths.insert(3, tmp_path / "missing.png")
    bad.insert(1, tmp_path / "missing.png")

    batches = list(iter_image_batches(paths, batch_size, workers=2))
    got_paths = [p for b in batches for p in b.paths]
    got_failures = [f.path for b in batches for f in b.failures]
    assert got_paths == good  # every good image, in input order
    assert got_failures == [str(p) for p in bad]  # every bad file, in order, each naming itself
    assert all(isinstance(f, ImageReadError) for b in batches for f in b.failures)
    sizes = [len(b.images) for b in batches]
    assert all(s == batch_size for s in sizes[:-1]) and sizes[-1] <= batch_size
    assert sizes[-1] > 0 or batches[-1].failures  # a trailing batch exists only to report failures
    for batch in batches:
        assert len(batch.paths) == len(batch.images)
        for path, image in zip(batch.paths, batch.images):
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert torch.equal(image, torch.from_numpy(read_image(path).copy()).permute(2, 0, 1))


@pytest.mark.parametrize("keep_decoded", [True, False])
def test_iter_image_batches_prepares_each_image_in_order(tmp_path, keep_decoded):
    """prepare= runs on each decoded image (any size, bad files skipped); its results in batch.prepared beside
    the decoded images, or with keep_decoded=False in place of them."""
    paths = []
    for i, (h, w) in enumerate([(5, 9), (12, 3), (1, 1), (7, 7), (3, 11)]):
        paths.append(tmp_path / f"{i}.png")
        _save(paths[-1], _rgb(h, w, seed=i))
    paths.insert(2, tmp_path / "missing.png")

    def prepare(pixels):  # something only this function makes: the image turned and made smaller
        return np.ascontiguousarray(pixels[::2, ::-1].transpose(1, 0, 2))

    batches = list(iter_image_batches(paths, 2, workers=2, as_tensors=False, prepare=prepare,
                                      keep_decoded=keep_decoded))
    good = [p for p in paths if p.exists()]
    assert [p for b in batches for p in b.paths] == good
    prepared = [x for b in batches for x in (b.prepared if keep_decoded else b.images)]
    assert [x.tobytes() for x in prepared] == [prepare(read_image(p)).tobytes() for p in good]
    if keep_decoded:
        assert [x.tobytes() for b in batches for x in b.images] == [read_image(p).tobytes() for p in good]
    else:
        assert all(b.prepared == [] for b in batches)


def test_iter_image_batches_all_bad_still_reports(tmp_path):
    bad = [tmp_path / "x.png", tmp_path / "y.png"]
    for path in bad:
        path.write_bytes(b"")
    batches = list(iter_image_batches(bad, 4))
    assert [b.images for b in batches] == [[]]
    assert [f.path for f in batches[0].failures] == [str(p) for p in bad]


def test_as_uint8_tensor_shapes_and_types():
    rgb = _rgb(3, 4)
    assert torch.equal(as_uint8_tensor(rgb), torch.from_numpy(rgb).permute(2, 0, 1))
    grey = rgb[..., 0]
    assert torch.equal(as_uint8_tensor(grey), torch.from_numpy(grey)[None].expand(3, -1, -1))
    deep = np.array([[0, 65535, 32896]], np.uint16)
    assert as_uint8_tensor(deep)[0].tolist() == [[0, 255, 128]]
    with pytest.raises(ValueError):
        as_uint8_tensor(np.zeros((3, 4), np.float32))


# ---------------------------------------------------------------- preprocessing

HALF = (0.5, 0.5, 0.5)


def _batch(h: int, w: int, value: int | None = None) -> torch.Tensor:
    if value is not None:
        return torch.full((2, 3, h, w), value, dtype=torch.uint8)
    return torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))


def test_shorter_side_resize_keeps_aspect_then_crop():
    pre = Preprocess(resize=256, crop=224, mean=HALF, std=HALF)
    assert pre.resized_size(300, 600) == (256, 512)
    assert pre.resized_size(600, 300) == (512, 256)
    assert pre.output_size(300, 600) == (224, 224)
    assert pre(_batch(300, 600)).shape == (2, 3, 224, 224)
    no_crop = Preprocess(resize=256, crop=None, mean=HALF, std=HALF)
    assert no_crop(_batch(300, 600)).shape == (2, 3, 256, 512)
    assert no_crop(_batch(600, 300)).shape == (2, 3, 512, 256)


def test_exact_resize_and_non_square_crop():
    pre = Preprocess(resize=(100, 150), crop=None, mean=HALF, std=HALF)
    assert pre(_batch(300, 600)).shape == (2, 3, 100, 150)
    assert pre.output_size(300, 600) == (100, 150)
    cropped = Preprocess(resize=(100, 150), crop=(60, 90), mean=HALF, std=HALF)
    assert cropped(_batch(300, 600)).shape == (2, 3, 60, 90)


def test_float_resize_for_gpus_agrees_with_the_uint8_kernel():
    # CUDA has no uint8 antialiased resize: the GPU path resizes in float and rounds. Same result to 1 level.
    from patchcore.io.preprocess import resize_uint8

    images = _batch(300, 437)
    for size in [(256, 373), (64, 90), (400, 600)]:
        exact = resize_uint8(images, size, in_float=False)
        via_float = resize_uint8(images, size, in_float=True)
        assert exact.dtype == via_float.dtype == torch.uint8 and exact.shape == via_float.shape == (2, 3, *size)
        assert (exact.int() - via_float.int()).abs().max() <= 1
        assert (exact == via_float).float().mean() > 0.75  # most pixels identical, even on noise


def _pillow_two_passes(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The oracle: Pillow's bilinear resize as two calls of one pass each, the width first, then the height."""
    picture = Image.fromarray(image)
    if size[1] != image.shape[1]:
        picture = picture.resize((size[1], image.shape[0]), Image.Resampling.BILINEAR)
    if size[0] != image.shape[0]:
        picture = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(picture)


@pytest.mark.parametrize("height, width", [(900, 900), (1024, 768), (333, 517), (517, 333), (257, 2000),
                                           (2000, 257), (31, 47), (5, 700), (1200, 1600), (911, 911)])
def test_resize_and_crop_give_pillows_bytes_whatever_is_cropped(height, width):
    # resize_crop_rgb asks Pillow only for the crop where every centre is exact (in / 256 is dyadic), and runs
    # only the rows it needs; resize_rgb is the whole image. Both must give the oracle's bytes.
    from patchcore.io import sizing
    from patchcore.io.resize import resize_crop_rgb, resize_rgb

    rng = np.random.default_rng(height * width)
    image = np.cumsum(rng.integers(0, 256, (height, width, 3)), axis=0).astype(np.uint8)  # structured, not flat
    cases = [(256, 224), (256, (224, 160)), (320, 256), ((256, 300), (224, 224)), ((100, 40), (64, 32)), (24, 16),
             (256, None)]
    for resize, crop in cases:
        size = sizing.resized_size(height, width, resize, scale=None, align=1)
        box = sizing.crop_box(size, crop)
        if box is None:
            continue
        top, left, h, w = box
        expected = _pillow_two_passes(image, size)
        np.testing.assert_array_equal(resize_rgb(image, size), expected)
        np.testing.assert_array_equal(resize_crop_rgb(image, size, box), expected[top:top + h, left:left + w])


def test_resize_takes_the_crop_box_where_it_is_exact_and_not_elsewhere():
    from patchcore.io.resize import _exact_source_span, _source_rows

    assert _exact_source_span(900, 256, 16, 224) == (56.25, 843.75)  # the MVTec geometry: 900 / 256 is dyadic
    assert _exact_source_span(1000, 341, 58, 224) is None  # 1000 / 341 is not
    assert _exact_source_span(900, 256, 0, 256) is None  # nothing cropped on that axis
    assert _exact_source_span(256, 256, 16, 224) is None  # no resize: a slice
    # The rows a vertical pass over 56.25..843.75 to 224 rows reads (hand-computed from Pillow's bounds: the
    # first centre 56.25 + 0.5 x 3.515625 = 58.0078125, support 3.515625: int(54.99) = 54; the last centre
    # 841.9921875: int(846.0078) = 846).
    assert _source_rows(900, 56.25, 843.75, 224) == (54, 846)


def test_preprocess_on_cpu_resizes_only_the_crop_with_the_same_bytes():
    pre = Preprocess(resize=256, crop=224, mean=HALF, std=HALF)
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 3, 900, 700), dtype=np.uint8))
    from patchcore.io.preprocess import resize_uint8

    size = pre.resized_size(900, 700)
    top, left, h, w = pre.crop_box(900, 700)
    expected = resize_uint8(images, size, in_float=False)[..., top:top + h, left:left + w]
    assert torch.equal(pre.geometry(images[0]), expected[0])
    torch.testing.assert_close(pre(images), pre.normalise(expected), rtol=0, atol=0)


def test_centre_crop_takes_the_centre():
    image = torch.arange(6 * 10, dtype=torch.uint8).view(1, 1, 6, 10).expand(1, 3, 6, 10).contiguous()
    pre = Preprocess(resize=None, crop=(2, 4), mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    out = pre(image)
    expected = image[..., 2:4, 3:7].float()  # top = (6 - 2) / 2, left = (10 - 4) / 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_normalisation():
    pre = Preprocess(resize=256, crop=224, mean=HALF, std=HALF)
    torch.testing.assert_close(pre(_batch(300, 400, value=255)), torch.ones(2, 3, 224, 224), rtol=0, atol=1e-6)
    torch.testing.assert_close(pre(_batch(300, 400, value=0)), -torch.ones(2, 3, 224, 224), rtol=0, atol=1e-6)
    per_channel = Preprocess(resize=None, crop=None, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = per_channel(_batch(4, 4, value=51))  # 51 / 255 = 0.2
    for c, value in enumerate([(0.2 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0.2 - 0.3) / 2.0]):
        torch.testing.assert_close(out[:, c], torch.full((2, 4, 4), value), rtol=0, atol=1e-6)


def test_crop_larger_than_the_image_raises():
    with pytest.raises(ValueError, match="larger than the resized image"):
        Preprocess(resize=None, crop=224, mean=HALF, std=HALF)(_batch(100, 300))
    with pytest.raises(ValueError, match="larger than the resized image"):
        Preprocess(resize=(128, 128), crop=(100, 200), mean=HALF, std=HALF)(_batch(300, 300))


def test_preprocess_rejects_non_uint8_batches():
    pre = Preprocess(resize=None, crop=None, mean=HALF, std=HALF)
    with pytest.raises(ValueError):
        pre(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError):
        pre(torch.zeros(3, 4, 4, dtype=torch.uint8))


# ---------------------------------------------------------------- hostile files, limits, orientation

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, scanlines: bytes, *, crc_ok: bool = True, payload: bytes | None = None) -> bytes:
    """An 8-bit RGB PNG of these raw scanlines (or of this raw IDAT payload)."""
    import struct
    import zlib

    idat = _png_chunk(b"IDAT", zlib.compress(scanlines) if payload is None else payload)
    if not crc_ok:
        idat = idat[:-4] + b"\0\0\0\0"
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + idat + _png_chunk(b"IEND", b""))


def _rows(width: int, height: int, filter_byte: int = 0) -> bytes:
    return b"".join(bytes([filter_byte]) + bytes((3 * y + x) % 251 for x in range(3 * width)) for y in range(height))


@pytest.mark.parametrize("kind", ["short_rows", "partial_row", "bad_filter", "zlib_garbage", "bad_adler"])
def test_png_data_errors_are_per_file_errors_not_crashes(tmp_path, kind):
    # Each of these made torchvision's decode_png (the former fast path) die with SIGSEGV.
    import zlib

    rows = _rows(30, 20)
    data = {"short_rows": lambda: _png(30, 20, rows[: len(rows) // 2]),  # whole rows missing
            "partial_row": lambda: _png(30, 20, rows[: len(rows) // 3]),
            "bad_filter": lambda: _png(30, 20, _rows(30, 20, filter_byte=9)),
            "zlib_garbage": lambda: _png(30, 20, b"", payload=zlib.compress(rows)[:2] + bytes(60)),
            "bad_adler": lambda: _png(30, 20, b"", payload=zlib.compress(rows)[:-4] + bytes(4))}[kind]()
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert info.value.path == str(path)


def test_complete_png_with_black_last_rows_is_not_mistaken_for_short_data(tmp_path):
    array = _rgb(40, 30, seed=3)
    array[-5:] = 0  # black at the bottom: read_image inflates the data to make sure it is all there
    assert np.array_equal(read_image(_save(tmp_path / "black_bottom.png", array)), array)
    assert np.array_equal(read_image(_save(tmp_path / "interlaced.png", array, interlace=1)), array)
    grey = np.zeros((7, 9), np.uint8)
    assert np.array_equal(read_image(_save(tmp_path / "all_black.png", grey)), np.zeros((7, 9, 3), np.uint8))


def test_png_with_a_bad_idat_crc_but_intact_data_decodes(tmp_path):
    # PIL, like many decoders, does not check IDAT CRCs; the pixels are intact, so this is not an error.
    path = tmp_path / "crc.png"
    path.write_bytes(_png(30, 20, _rows(30, 20), crc_ok=False))
    assert read_image(path).shape == (20, 30, 3)


def test_pixel_and_aspect_limits_refuse_before_decoding(tmp_path, monkeypatch):
    import struct

    huge = tmp_path / "huge.png"  # header only: 30000 x 30000 with no image data; refused from the header
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match="PATCHCORE_MAX_PIXELS") as info:
        read_image(huge)
    assert info.value.path == str(huge)
    ok = _save(tmp_path / "ok.png", _rgb(30, 40))
    monkeypatch.setenv("PATCHCORE_MAX_PIXELS", "1000")
    with pytest.raises(ImageReadError, match=r"1200 pixels|1\.2 Mpx|above the limit"):
        read_image(ok)
    monkeypatch.setenv("PATCHCORE_MAX_PIXELS", "1200")
    assert read_image(ok).shape == (30, 40, 3)
    monkeypatch.delenv("PATCHCORE_MAX_PIXELS")
    strip = _save(tmp_path / "strip.png", _rgb(2, 100))
    with pytest.raises(ImageReadError, match="aspect ratio.*PATCHCORE_MAX_ASPECT_RATIO"):
        read_image(strip)
    monkeypatch.setenv("PATCHCORE_MAX_ASPECT_RATIO", "50")
    assert read_image(strip).shape == (2, 100, 3)
    monkeypatch.setenv("PATCHCORE_MAX_ASPECT_RATIO", "lots")
    with pytest.raises(ConfigError, match="PATCHCORE_MAX_ASPECT_RATIO"):
        read_image(strip)


def test_resize_cap_is_a_per_file_error_in_batches(tmp_path, monkeypatch):
    pre = Preprocess(resize=None, crop=None, mean=HALF, std=HALF)
    small = [_save(tmp_path / f"s{i}.png", _rgb(10, 10, seed=i)) for i in range(3)]
    big = _save(tmp_path / "big.png", _rgb(40, 40))
    monkeypatch.setenv("PATCHCORE_MAX_RESIZED_PIXELS", "400")
    batches = list(iter_image_batches([small[0], big, small[1], small[2]], 2, check=pre.check_size))
    assert [p for b in batches for p in b.paths] == small
    (failure,) = [f for b in batches for f in b.failures]
    assert failure.path == str(big) and "PATCHCORE_MAX_RESIZED_PIXELS" in failure.reason
    with pytest.raises(InputError, match="MAX_RESIZED_PIXELS"):  # a batch tensor past the cap: the whole call
        pre(_batch(40, 40))
    shorter_side = Preprocess(resize=256, crop=None, mean=HALF, std=HALF)
    monkeypatch.delenv("PATCHCORE_MAX_RESIZED_PIXELS")
    with pytest.raises(InputError, match="256 x 10240000"):
        shorter_side.check_size(1, 40000)
    crop = Preprocess(resize=None, crop=16, mean=HALF, std=HALF)
    with pytest.raises(ImageReadError, match="larger than the resized image"):
        read_image(small[0], check=crop.check_size)


def test_read_ahead_is_bounded_in_bytes(tmp_path, monkeypatch):
    import threading

    import patchcore.io.images as images

    paths = [_save(tmp_path / f"{i}.png", _rgb(20, 20, seed=i)) for i in range(8)]
    active, peak, lock = [0], [0], threading.Lock()
    real = images.read_image

    def counting(path, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(path, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(images, "read_image", counting)
    monkeypatch.setenv("PATCHCORE_READAHEAD_BYTES", str(3 * 20 * 20))  # one image's worth
    got = [p for b in iter_image_batches(paths, 4, workers=4) for p in b.paths]
    assert got == paths and peak[0] == 1  # one file ahead at a time, however many workers


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    upright = _rgb(6, 10, seed=5)  # 6 high, 10 wide
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # 10 high, 6 wide; tag 6 says: turn 90 clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    png = tmp_path / "rot.png"
    Image.fromarray(stored).save(png, exif=exif.tobytes())
    assert np.array_equal(read_image(png), upright)  # 8-bit PNG: the former fast path ignored the tag
    jpeg = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(jpeg, exif=exif.tobytes(), quality=95)
    assert read_image(jpeg).shape == (6, 10, 3)
    with Image.open(png) as in_memory:  # a PIL image given to the Python API: the same picture as its file
        assert torch.equal(as_uint8_tensor(in_memory), torch.from_numpy(upright).permute(2, 0, 1))
    assert as_uint8_tensor(stored).shape == (3, 10, 6)  # arrays carry no EXIF: taken as they are


def test_header_size_is_read_images_size_without_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    upright = _rgb(6, 10, seed=5)
    stored = np.ascontiguousarray(np.rot90(upright, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [_save(tmp_path / "plain.png", upright), _save(tmp_path / "rot.png", stored, exif=exif.tobytes()),
             _save(tmp_path / "rot.jpg", stored, exif=exif.tobytes(), quality=95),
             _save(tmp_path / "plain.tif", stored)]
    expected = [read_image(path).shape[:2] for path in files]
    assert expected == [(6, 10), (6, 10), (6, 10), (10, 6)]

    def no_decoding(self):
        raise AssertionError(f"{self.filename} decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert [header_size(path) for path in files] == expected  # PIL's PNG getexif would decode: not called
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="text.png: not an image file"):
        header_size(tmp_path / "text.png")


def test_multi_frame_files_give_their_first_frame(tmp_path):
    first, second = _rgb(8, 9, seed=1), _rgb(5, 4, seed=2)
    path = tmp_path / "frames.tif"
    Image.fromarray(first).save(path, save_all=True, append_images=[Image.fromarray(second)])
    assert np.array_equal(read_image(path), first)


def test_formats_outside_the_list_are_refused_whatever_the_suffix(tmp_path):
    path = tmp_path / "really_pcx.png"
    Image.fromarray(_rgb(8, 8)).save(path, format="PCX")
    with pytest.raises(ImageReadError, match="not an image file"):
        read_image(path)
    jpeg_named_png = tmp_path / "jpeg.png"
    Image.fromarray(_rgb(8, 8)).save(jpeg_named_png, format="JPEG")
    assert read_image(jpeg_named_png).shape == (8, 8, 3)  # by content: a JPEG is read as one


@pytest.mark.parametrize("empty", [np.zeros((0, 0), np.uint8), np.zeros((0, 5, 3), np.uint8),
                                   torch.zeros(3, 0, 0, dtype=torch.uint8), Image.new("RGB", (0, 0))],
                         ids=["array_0x0", "array_0x5", "tensor", "pil"])
def test_empty_in_memory_images_are_input_errors(empty):
    from patchcore.estimator.inputs import as_image_list, iter_batches

    with pytest.raises(InputError, match="empty"):
        list(iter_batches(as_image_list(empty), 2))
    with pytest.raises(InputError, match="empty"):
        as_uint8_tensor(empty)


def test_empty_batch_tensor_and_float_tensors_are_input_errors():
    from patchcore.estimator.inputs import as_image_list

    with pytest.raises(InputError, match="empty"):
        as_image_list(torch.zeros(2, 3, 0, 4, dtype=torch.uint8))
    with pytest.raises(InputError, match="uint8"):
        as_uint8_tensor(torch.zeros(3, 4, 4))
