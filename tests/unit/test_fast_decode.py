"""The simplejpeg fast path (tasks.core.imaging.fast_pixels) gives Pillow's pixels byte for byte, and leaves to
Pillow every JPEG it is not sure about (EXIF rotation, CMYK, damaged data)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.core import imaging
from tasks.core.imaging import ImageRejected, decode, fast_pixels, preprocess

pytest.importorskip("simplejpeg")


def _jpeg(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return imaging.normalise(img)


def _photo(h: int, w: int, seed: int, gray: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 5 + seed), np.cos(y / 7), np.sin((x + y) / 11)], -1) * 90 + 128
    px = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    return px[..., 0] if gray else px


CASES = [
    {"shape": (32, 32), "kw": {"quality": 90}},
    {"shape": (31, 45), "kw": {"quality": 75, "subsampling": 2}},           # odd sizes, 4:2:0
    {"shape": (40, 24), "kw": {"quality": 95, "subsampling": 0}},           # 4:4:4
    {"shape": (33, 17), "kw": {"quality": 85, "subsampling": 1}},           # 4:2:2
    {"shape": (64, 48), "kw": {"quality": 80, "progressive": True}},
    {"shape": (300, 257), "kw": {"quality": 70, "optimize": True}},
    {"shape": (29, 35), "kw": {"quality": 90}, "gray": True},
    {"shape": (384, 384), "kw": {"quality": 90}},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['shape']}{'-gray' if c.get('gray') else ''}-{c['kw']}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_is_pillow_byte_for_byte(case, seed):
    data = _jpeg(_photo(*case["shape"], seed, case.get("gray", False)), **case["kw"])
    img = Image.open(io.BytesIO(data))
    fast = fast_pixels(img, data)
    assert fast is not None, "a plain JPEG takes the fast path"
    slow = _pillow(data)
    assert fast.dtype == slow.dtype == np.uint8 and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)
    d = decode(data, max_pixels=10**7)
    np.testing.assert_array_equal(d.pixels, slow)
    assert (d.format, d.mode, d.width, d.height) == ("JPEG", img.mode, slow.shape[1], slow.shape[0])
    # the shard stage's fast branch == preprocess() on the loaded image
    for res, how in ((32, "center_crop"), (24, "stretch")):
        want = preprocess(Image.open(io.BytesIO(data)), res, 3, how)
        got = imaging.to_channels(imaging.resize_square(fast, res, how), 3)
        np.testing.assert_array_equal(got, want)


def test_exif_rotated_jpeg_is_left_to_pillow():
    exif = Image.Exif()
    exif[imaging.ORIENTATION] = 6
    data = _jpeg(_photo(16, 24, 3), quality=90, exif=exif.tobytes())
    assert fast_pixels(Image.open(io.BytesIO(data)), data) is None
    assert decode(data, max_pixels=10**6).pixels.shape == (24, 16, 3)  # upright, through Pillow


def test_cmyk_jpeg_is_left_to_pillow():
    buf = io.BytesIO()
    Image.fromarray(_photo(16, 16, 4)).convert("CMYK").save(buf, format="JPEG")
    data = buf.getvalue()
    assert fast_pixels(Image.open(io.BytesIO(data)), data) is None
    assert decode(data, max_pixels=10**6).pixels.shape == (16, 16, 3)


def test_truncated_jpeg_is_still_rejected_by_pillow():
    data = _jpeg(_photo(64, 64, 5), quality=90)
    cut = data[: len(data) // 2]
    assert fast_pixels(Image.open(io.BytesIO(cut)), cut) is None
    with pytest.raises(ImageRejected) as err:
        decode(cut, max_pixels=10**6)
    assert err.value.reason == "corrupt_image"


def test_without_simplejpeg_pillow_decodes(monkeypatch):
    data = _jpeg(_photo(20, 20, 6), quality=90)
    monkeypatch.setattr(imaging, "_simplejpeg", None)
    assert fast_pixels(Image.open(io.BytesIO(data)), data) is None
    np.testing.assert_array_equal(decode(data, max_pixels=10**6).pixels, _pillow(data))


@pytest.mark.parametrize("shape", [(32, 32), (48, 40), (8, 8)])
def test_phash_matches_the_median_definition(shape):
    """phash's 32nd-smallest shortcut gives np.median's bits (and the PIL-free 32x32 path PIL's)."""
    gray = _photo(*shape, 7, gray=True)
    img = Image.fromarray(gray)
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.Resampling.LANCZOS)
    small = np.asarray(img, dtype=np.float64)
    d8 = imaging._dct_matrix()[:8]
    low = (d8 @ small @ d8.T).ravel()
    want = int(np.packbits(low > np.median(low[1:])).view(">u8")[0])
    assert imaging.phash(gray) == want


# (shape, encoder settings, grey, resolution, the scale expected: the largest of 8, 4, 2 dividing both sides with
# the shorter one still >= 2x the resolution)
DRAFTED = [((384, 384), {"quality": 90}, False, 32, 4), ((336, 500), {"quality": 85, "subsampling": 0}, False, 64, 2),
           ((256, 200), {"quality": 95, "subsampling": 1}, False, 24, 4), ((480, 640), {"quality": 80}, True, 32, 4),
           ((512, 512), {"quality": 75, "progressive": True}, False, 100, 2), ((258, 300), {"quality": 90}, False,
                                                                                64, 2), ((1024, 768), {}, False, 32, 8)]


@pytest.mark.parametrize(("shape", "kw", "gray", "res", "scale"), DRAFTED, ids=lambda v: str(v))
def test_a_scaled_jpeg_decodes_to_the_same_pixels_on_both_paths(shape, kw, gray, res, scale):
    """shard.decode: scaled: shard's simplejpeg branch and the served model's Pillow draft give the same pixels."""
    data = _jpeg(_photo(*shape, 3, gray), **kw)
    img = Image.open(io.BytesIO(data))
    imaging.scaled_draft(img, res)
    assert img.size == (shape[1] // scale, shape[0] // scale) and img.decoderconfig[0] == scale
    fast = fast_pixels(img, data)
    assert fast is not None and fast.shape[:2] == (img.height, img.width)
    served = imaging.open_image(data, max_pixels=10**8, draft_to=res, setting="")   # what serving loads
    np.testing.assert_array_equal(fast, imaging.normalise(served))
    got = imaging.to_channels(imaging.resize_square(fast, res), 3)
    np.testing.assert_array_equal(got, preprocess(imaging.open_image(data, max_pixels=10**8, draft_to=res), res, 3))
    # and it is a different decode from the full one (what shard.decode: full keeps)
    full = preprocess(imaging.open_image(data, max_pixels=10**8), res, 3)
    assert full.shape == got.shape and not np.array_equal(full, got)
    # on a photo-like picture (smooth, unlike _photo's noise) the two are the same picture, resampled differently
    from tests.support.pictures import canvas

    smooth = np.stack([canvas(k, size=max(shape), sigma=max(shape) / 40)[:shape[0], :shape[1]] for k in range(3)], -1)
    data = _jpeg(smooth[..., 0] if gray else smooth, **kw)
    full = preprocess(imaging.open_image(data, max_pixels=10**8), res, 3)
    scaled = preprocess(imaging.open_image(data, max_pixels=10**8, draft_to=res), res, 3)
    # much closer to the full decode than the full decode is to itself moved by one output pixel (measured: 1.3-3 %
    # of that, 13 % when the reduced image is barely twice the output, as 50 px for 24 here)
    diff = np.abs(full.astype(int) - scaled).mean()
    moved = np.abs(full[:, 1:].astype(int) - full[:, :-1]).mean()
    assert diff < 0.15 * moved, (diff, moved)


def test_scaled_leaves_small_images_other_formats_and_odd_sizes_alone():
    for shape in ((127, 160), (333, 500), (384, 385)):   # under 4x the resolution; no scale divides both sides
        img = Image.open(io.BytesIO(_jpeg(_photo(*shape, 1), quality=90)))
        imaging.scaled_draft(img, 32)
        assert img.size == shape[::-1] and not img.decoderconfig, shape
    png = io.BytesIO()
    Image.fromarray(_photo(400, 400, 1)).save(png, "PNG")
    img = Image.open(png)
    imaging.scaled_draft(img, 32)
    assert img.size == (400, 400)


# ---- plain_jpeg: a JPEG's header read in C, without Pillow opening the file (ingest's decode, shard)
def _exif(orientation: int | None, comment: bool = False) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[imaging.ORIENTATION] = orientation
    if comment:
        exif[0x010E] = "a description"  # ImageDescription: Exif with no Orientation
    return exif


XMP_ROTATED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
               b'</x:xmpmeta>')


def _variants() -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, whether plain_jpeg takes it); each with Pillow's own answer to compare against."""
    rgb, gray = _photo(40, 56, 3), _photo(24, 40, 4, gray=True)
    two = io.BytesIO()
    Image.fromarray(rgb).save(two, "MPO", save_all=True, append_images=[Image.fromarray(rgb[::-1].copy())])
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    icc = Image.new("RGB", (4, 4)).info.get("icc_profile") or b"\0" * 128  # any bytes: Pillow does not apply it
    plain = _jpeg(rgb, quality=88)
    return {
        "baseline 4:2:0": (plain, True),
        "4:4:4": (_jpeg(rgb, subsampling=0), True),
        "progressive": (_jpeg(rgb, progressive=True), True),
        "optimized": (_jpeg(rgb, optimize=True), True),
        "grey": (_jpeg(gray), True),
        "with a comment": (_jpeg(rgb, comment=b"made by a camera"), True),
        "with an ICC profile": (_jpeg(rgb, icc_profile=icc), True),
        "restart markers": (_jpeg(rgb, restart_marker_blocks=2), True),
        "fill bytes before a marker": (plain[:2] + b"\xff\xff" + plain[2:], True),
        "trailing bytes": (plain + b"\0" * 40, True),
        "EXIF orientation 6": (_jpeg(rgb, exif=_exif(6)), False),
        "EXIF orientation 1": (_jpeg(rgb, exif=_exif(1)), False),
        "EXIF without orientation": (_jpeg(rgb, exif=_exif(None, comment=True)), False),
        "XMP orientation 6": (_jpeg(rgb, xmp=XMP_ROTATED), False),  # Pillow reads tiff:Orientation there too
        "XMP without orientation": (_jpeg(rgb, xmp=XMP_ROTATED.replace(b"tiff:Orientation", b"tiff:Make")), False),
        "MPO (two frames)": (two.getvalue(), False),
        "CMYK (Adobe)": (cmyk.getvalue(), False),
        "truncated": (plain[: len(plain) // 2], True),
        "short JFIF segment": (plain[:2] + b"\xff\xe0\x00\x07JFIF\x00" + _segments_after_app0(plain), False),
        "short ICC chunk": (plain[:2] + b"\xff\xe2\x00\x0eICC_PROFILE\x00" + plain[2:], False),
        "JPG extension segment": (plain[:2] + b"\xff\xf1\x00\x04\xff\xd9" + plain[2:], False),
        "Photoshop segment": (plain[:2] + b"\xff\xed\x00\x12Photoshop 3.0\x008B" + plain[2:], False),
        "header only": (plain[:200], False),
        "PNG": (_png(rgb), False),
        "empty": (b"", False),
    }


def _segments_after_app0(data: bytes) -> bytes:
    assert data[2:4] == b"\xff\xe0"
    return data[4 + int.from_bytes(data[4:6], "big"):]


def _png(px: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


def _through_pillow(monkeypatch, fn):
    """``fn()`` with the header fast path off: what decode and shard did before it, Pillow opening every file."""
    with monkeypatch.context() as m:
        m.setattr(imaging, "plain_jpeg", lambda data: None)
        from tasks import shard
        m.setattr(shard, "plain_jpeg", lambda data: None)
        try:
            return fn()
        except ImageRejected as exc:
            return exc


@pytest.mark.parametrize("name", list(_variants()))
def test_a_plain_jpeg_is_what_pillow_says_and_decodes_the_same(name, monkeypatch):
    data, plain = _variants()[name]
    header = imaging.plain_jpeg(data)
    assert (header is not None) == plain, header
    if header is not None:  # Pillow opening the file agrees on everything the fast path skips it for
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size, img.mode) == ("JPEG", header[:2], header[2])
        assert img.getexif().get(imaging.ORIENTATION) is None
        # and simplejpeg decodes it (decode's header path is taken), but for the damaged one, which goes to Pillow
        assert (imaging.jpeg_pixels(data, header[2], header[:2]) is None) == (name == "truncated")
    # the stage-level result is the same either way: the pixels, or the refusal and its words
    try:
        fast = decode(data, max_pixels=10**7)
    except ImageRejected as exc:
        fast = exc
    slow = _through_pillow(monkeypatch, lambda: decode(data, max_pixels=10**7))
    assert type(fast) is type(slow)
    if isinstance(slow, ImageRejected):
        assert (fast.reason, fast.detail) == (slow.reason, slow.detail)
    else:
        assert (fast.format, fast.mode, fast.width, fast.height) == (slow.format, slow.mode, slow.width, slow.height)
        np.testing.assert_array_equal(fast.pixels, slow.pixels)


@pytest.mark.parametrize(("kw", "reason"), [({"max_pixels": 2000}, "decompression_bomb"),
                                             ({"max_pixels": 10**7, "allowed_formats": ["PNG"]},
                                              "format_not_allowed"),
                                             ({"max_pixels": 10**7, "min_side": 48}, "too_small")])
def test_the_header_path_refuses_with_pillows_words(kw, reason, monkeypatch):
    data = _jpeg(_photo(40, 56, 5))
    assert imaging.plain_jpeg(data) == (56, 40, "RGB")
    with pytest.raises(ImageRejected) as fast:
        decode(data, **kw)
    slow = _through_pillow(monkeypatch, lambda: decode(data, **kw))
    assert fast.value.reason == slow.reason == reason and fast.value.detail == slow.detail


@pytest.mark.parametrize("decode_mode", ["scaled", "full"])
def test_shard_pixels_are_the_same_with_and_without_the_header_path(decode_mode, monkeypatch):
    from tasks import shard

    blobs = [data for data, _ in _variants().values() if data and imaging.plain_jpeg(data) is not None
             and len(data) > 1000] + [_jpeg(_photo(256, 384, 6)), _jpeg(_photo(192, 128, 7, gray=True))]
    blobs = [b for b in blobs if not isinstance(_through_pillow(monkeypatch, lambda b=b: decode(b, max_pixels=10**7)),
                                                ImageRejected)]  # shard only sees what ingest took
    shard._init({"resolution": 16, "channels": 3, "resize": "center_crop", "background": [255, 255, 255],
                 "decode": decode_mode})
    fast = shard._decode(blobs)
    slow = _through_pillow(monkeypatch, lambda: shard._decode(blobs))
    np.testing.assert_array_equal(fast, slow)
