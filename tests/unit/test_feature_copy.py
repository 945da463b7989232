"""ingest's perceptual features read imaging.feature_pixels: the image itself under 128 px on its shorter side (so
CIFAR-size and digit sets keep every feature bit), a box-reduced copy above it; pixel_sha always reads every pixel."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from tasks.core import imaging
from tests.support.pictures import canvas


@pytest.mark.parametrize("shape", [(32, 32, 3), (127, 500, 3), (8, 8), (100, 127)])
def test_small_images_are_their_own_feature_copy(shape):
    px = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert imaging.feature_pixels(px) is px


@pytest.mark.parametrize(("shape", "expected"), [((384, 384, 3), (64, 64, 3)), ((128, 300), (64, 150)),
                                                 ((200, 201, 3), (67, 67, 3)), ((1080, 1920, 3), (68, 120, 3))])
def test_large_images_are_box_reduced_keeping_the_shorter_side_at_64_or_more(shape, expected):
    px = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    small = imaging.feature_pixels(px)
    assert small.shape == expected and small.dtype == np.uint8
    f = min(shape[:2]) // imaging.FEATURE_SIDE
    # a box mean: the top-left cell is the rounded mean of the top-left f x f block
    assert abs(int(small[0, 0].ravel()[0]) - px[:f, :f].reshape(f * f, -1)[:, 0].mean()) <= 0.5


def test_features_of_a_large_image_are_those_of_its_copy_but_pixel_sha_reads_every_pixel():
    px = np.repeat(canvas(5, size=384, sigma=30.0)[..., None], 3, axis=2)
    b, c, sha, ph = imaging.features(px)
    gray = imaging.to_gray(imaging.feature_pixels(px))
    assert (b, c, ph) == (float(gray.mean()), float(gray.std()), imaging.phash(gray))
    assert sha == hashlib.sha256(f"{px.shape}".encode() + px.tobytes()).hexdigest()
    # and they are close to what the full image gives: the copy changes the features, not what they say
    full = imaging.to_gray(px)
    assert abs(b - full.mean()) < 0.5 and abs(c - full.std()) < 2.0
    assert (ph ^ imaging.phash(full)).bit_count() <= 4
    # a 1-px change anywhere changes pixel_sha (the exact-duplicate key is not of the reduced copy)
    moved = px.copy()
    moved[383, 383, 2] ^= 1
    assert imaging.features(moved)[2] != sha


def test_a_jpeg_and_its_png_of_the_same_pixels_share_pixel_sha():
    import io

    px = np.repeat(canvas(6, size=256, sigma=20.0)[..., None], 3, axis=2)
    jpg = io.BytesIO()
    Image.fromarray(px).save(jpg, "JPEG", quality=90)
    decoded = imaging.decode(jpg.getvalue(), max_pixels=10**8).pixels
    png = io.BytesIO()
    Image.fromarray(decoded).save(png, "PNG")
    a = imaging.features(decoded)[2]
    assert a == imaging.features(imaging.decode(png.getvalue(), max_pixels=10**8).pixels)[2]
