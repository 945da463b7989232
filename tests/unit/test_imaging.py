"""tasks.core.imaging: EXIF orientation in the one shared decode rule, ingest's format list, and a bomb guard that
leaves Pillow's process-wide limit alone."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from tasks.core.imaging import ImageRejected, decode, open_image, preprocess
from tests.conftest import encode, pattern

FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]  # ingest.allowed_formats' default


def upright_image() -> np.ndarray:
    """8 rows x 12 columns RGB, no symmetry: any rotation or flip changes it."""
    blocks = np.random.default_rng(21).integers(0, 256, size=(2, 3, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((4, 4, 1), np.uint8))


def tagged(pixels: np.ndarray, orientation: int, fmt: str, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(pixels, fmt, exif=exif.tobytes(), **kw)


# orientation -> the stored pixels of an upright image (what a camera writes beside that tag)
STORED = {6: lambda u: np.rot90(u, 1), 8: lambda u: np.rot90(u, -1), 3: lambda u: u[::-1, ::-1]}


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_decodes_to_the_upright_image(orientation):
    up = upright_image()
    assert up.shape == (8, 12, 3)
    d = decode(tagged(np.ascontiguousarray(STORED[orientation](up)), orientation, "PNG"), max_pixels=10**6)
    assert (d.height, d.width) == (8, 12)  # what ingest records: the upright size
    np.testing.assert_array_equal(d.pixels, up)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_oriented_jpeg_decodes_upright(orientation):
    up = upright_image()
    stored = np.ascontiguousarray(STORED[orientation](up))
    plain = decode(encode(stored, "JPEG", quality=95), max_pixels=10**6)  # the same stored pixels, no tag
    d = decode(tagged(stored, orientation, "JPEG", quality=95), max_pixels=10**6)
    assert (plain.height, plain.width) == (12, 8) and (d.height, d.width) == (8, 12)
    back = np.rot90(plain.pixels, -1 if orientation == 6 else 1)
    np.testing.assert_array_equal(d.pixels, back)  # exactly the stored pixels, turned upright
    assert np.abs(d.pixels.astype(int) - up).mean() < 8  # and (up to JPEG loss) the upright image


def test_shard_and_serving_path_sees_the_upright_image():
    """shard and serving load the bytes themselves and call preprocess: the same rule applies there."""
    up = upright_image()
    img = Image.open(io.BytesIO(tagged(np.ascontiguousarray(np.rot90(up, 1)), 6, "PNG")))
    img.load()
    np.testing.assert_array_equal(preprocess(img, 8, 3), preprocess(Image.fromarray(up), 8, 3))


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 90}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_no_exif_decodes_exactly_as_plain_pillow(fmt, kw):
    data = encode(pattern(22, 16), fmt, **kw)
    plain = Image.open(io.BytesIO(data))
    d = decode(data, max_pixels=10**6)
    np.testing.assert_array_equal(d.pixels, np.asarray(plain.convert("RGB")))
    assert (d.width, d.height) == plain.size


def test_digits_like_gray_png_is_unchanged():
    """the builtin digits are 8x8 grayscale PNGs without EXIF (the golden-weights contract's input)."""
    arr = (np.random.default_rng(0).integers(0, 17, size=(8, 8)) * 255 // 16).astype(np.uint8)
    data = encode(arr)
    d = decode(data, max_pixels=10**6)
    np.testing.assert_array_equal(d.pixels, np.asarray(Image.open(io.BytesIO(data))))
    assert d.mode == "L" and (d.width, d.height) == (8, 8)


def test_orientation_1_and_unreadable_exif_leave_the_image_as_stored():
    px = pattern(23, 16)
    np.testing.assert_array_equal(decode(tagged(px, 1, "PNG"), max_pixels=10**6).pixels, px)
    junk = encode(px, "PNG", exif=b"Exif\x00\x00garbage!!!!")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow may say "Corrupt EXIF data"
        np.testing.assert_array_equal(decode(junk, max_pixels=10**6).pixels, px)


def test_format_outside_the_allowed_list_is_refused_naming_both():
    with pytest.raises(ImageRejected) as err:
        decode(encode(pattern(24, 16), "PPM"), max_pixels=10**6, allowed_formats=FORMATS)
    assert err.value.reason == "format_not_allowed"
    assert err.value.detail == "PPM not in ingest.allowed_formats (JPEG, PNG, BMP, GIF, WEBP, TIFF)"
    with pytest.raises(ImageRejected, match=r"format_not_allowed: ICO not in ingest.allowed_formats \(PNG\)"):
        decode(encode(pattern(24, 16), "ICO"), max_pixels=10**6, allowed_formats=["PNG"])
    assert decode(encode(pattern(24, 16), "PPM"), max_pixels=10**6).format == "PPM"  # None: no list applied


# ---- the bomb guard, with Pillow's process-wide limit left as the host set it


@pytest.fixture
def pillow_limit():
    """Pillow's process-wide limit before the test (restored after it, so one failure does not spread)."""
    before = Image.MAX_IMAGE_PIXELS
    yield before
    Image.MAX_IMAGE_PIXELS = before


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` over a few bytes of data: what a header bomb sends."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decode_leaves_the_global_alone_on_a_normal_image(pillow_limit):
    decode(encode(pattern(25, 16)), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_over_limit_image_is_refused_and_the_global_left_alone(pillow_limit):
    with pytest.raises(ImageRejected) as err:
        decode(encode(pattern(26, 128)), max_pixels=10_000)
    assert err.value.reason == "decompression_bomb"
    assert err.value.detail == "128x128 = 16384 pixels > ingest.max_pixels=10000"
    assert Image.MAX_IMAGE_PIXELS == pillow_limit


def test_header_bomb_past_pillows_own_limit_is_refused(pillow_limit):
    """30000 x 30000 = 900 M pixels: Pillow itself raises on open (past twice its default); still our reason."""
    with pytest.raises(ImageRejected) as err:
        decode(png_header(30000, 30000), max_pixels=89_478_485)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit
    assert err.value.reason == "decompression_bomb"
    assert "could be decompression bomb" in err.value.detail
    assert f"Image.MAX_IMAGE_PIXELS={pillow_limit}; ingest.max_pixels=89478485" in err.value.detail


def test_hosts_own_pillow_limit_is_respected_not_changed(monkeypatch):
    """A host that lowered Pillow's limit: no warning escapes below twice it, past that a refusal, and the
    host's value is still there afterwards; a host that switched Pillow's guard off keeps keel's."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns past 1000 px; that is not the caller's concern
        assert decode(encode(pattern(27, 40)), max_pixels=10_000).width == 40  # 1600 px
    with pytest.raises(ImageRejected, match=r"decompression_bomb: .*Image.MAX_IMAGE_PIXELS=1000; "
                                            r"ingest.max_pixels=10000"):
        decode(encode(pattern(27, 48)), max_pixels=10_000)  # 2304 px > 2 x 1000
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageRejected, match=r"^decompression_bomb: 128x128 = 16384 pixels > max_pixels=10000$"):
        open_image(encode(pattern(26, 128)), max_pixels=10_000, setting="")
    assert Image.MAX_IMAGE_PIXELS is None


def test_empty_and_garbage_keep_their_reasons():
    with pytest.raises(ImageRejected, match="^empty_file: zero bytes$"):
        decode(b"", max_pixels=100)
    with pytest.raises(ImageRejected, match="^not_an_image: 9 bytes that no image decoder recognises$"):
        decode(b"not a png", max_pixels=100)
