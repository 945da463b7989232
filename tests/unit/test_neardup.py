"""core.neardup on real thumbnails: the thumbnail, the descriptor, the aligned verification, the candidate search."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.core import align, io, neardup
from tasks.core.errors import DataError
from tests.support.pictures import canvas, crop

P = neardup.Params()


def resized(a: np.ndarray, s: int = 32) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((s, s), Image.Resampling.BILINEAR))


def verify1(a: np.ndarray, b: np.ndarray, params: neardup.Params = P):
    ok, ncc, det, names = neardup.verify(a[None], b[None], params)
    return bool(ok[0]), float(ncc[0]), float(det[0]), names[0]


# ---------------------------------------------------------------- thumbnail
def test_io_and_neardup_agree_on_the_thumbnail_side():
    assert io.THUMB == neardup.THUMB == 32


@pytest.mark.parametrize("shape", [(120, 90), (32, 32), (8, 8), (20, 50)])
def test_thumbnail_is_32x32_grey_bytes(shape):
    gray = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    t = neardup.thumbnail(gray)
    assert isinstance(t, bytes) and len(t) == 1024
    arr = neardup.thumbs_array([t, t])
    assert arr.shape == (2, 32, 32) and arr.dtype == np.uint8
    if shape == (32, 32):
        assert np.array_equal(arr[0], gray)  # already thumbnail-sized: untouched


def test_thumbnail_of_a_large_image_is_a_box_average_and_of_a_small_one_an_upsample():
    big = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, np.ones((16, 16), np.uint8))  # 128 x 128
    t = neardup.thumbs_array([neardup.thumbnail(big)])[0]
    assert np.array_equal(t, np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, np.ones((4, 4), np.uint8)))
    small = np.zeros((8, 8), np.uint8)
    small[:, 4:] = 200
    t = neardup.thumbs_array([neardup.thumbnail(small)])[0]
    assert t[:, :12].max() == 0 and t[:, 20:].min() == 200  # left dark, right bright, interpolated between
    assert 0 < t[0, 16] < 200


def test_thumbs_array_of_nothing():
    assert neardup.thumbs_array([]).shape == (0, 32, 32)


# ---------------------------------------------------------------- descriptors
def test_descriptors_are_unit_length_and_mirror_like_the_flipped_thumbnails():
    th = np.stack([crop(canvas(s)) for s in range(50)])
    d = neardup.descriptors(th)
    assert d.shape == (50, 64) and d.dtype == np.float32
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    assert np.allclose(d.mean(axis=1), 0.0, atol=1e-6)
    flipped = neardup.descriptors(np.ascontiguousarray(th[:, :, ::-1]))
    assert np.allclose(neardup.mirrored(d), flipped, atol=1e-5)
    assert not np.allclose(d, flipped, atol=0.1)  # the flip really changes the descriptor


def test_descriptor_of_a_flat_thumbnail_is_zero():
    d = neardup.descriptors(np.stack([np.full((32, 32), v, np.uint8) for v in (0, 77, 200)]))
    assert not d.any()


def test_descriptor_barely_moves_under_a_small_shift_and_light_change():
    c = canvas(3)
    d = neardup.descriptors(np.stack([crop(c), crop(c, 1, 2),
                                      np.clip(crop(c) * 1.1, 0, 255).astype(np.uint8), crop(canvas(4))]))
    assert d[0] @ d[1] > P.min_candidate_similarity and d[0] @ d[2] > 0.99
    assert d[0] @ d[3] < 0.5


# ---------------------------------------------------------------- verify
def _brightness(a, f):
    return np.clip(a.astype(np.float64) * f, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("how", ["roll 1 px", "shift 1 px", "shift 2 px", "flip", "flip and shift", "crop 2 px",
                                 "crop 1 px", "brightness +10%", "contrast -20%"])
def test_verify_passes_a_transformed_copy(how):
    c = canvas(11)
    a = crop(c)
    b = {
        "roll 1 px": np.roll(a, 1, axis=1),
        "shift 1 px": crop(c, 1, 0),
        "shift 2 px": crop(c, 2, -1),
        "flip": a[:, ::-1],
        "flip and shift": crop(c, 1, 1)[:, ::-1],
        "crop 2 px": resized(a[2:-2, 2:-2]),
        "crop 1 px": resized(a[1:-1, 1:-1]),
        "brightness +10%": _brightness(a, 1.1),
        "contrast -20%": np.clip((a.astype(np.float64) - 128) * 0.8 + 140, 0, 255).astype(np.uint8),
    }[how]
    ok, ncc, detail, transform = verify1(a, np.ascontiguousarray(b))
    assert ok, (how, ncc, detail, transform)
    assert ncc >= P.min_ncc and detail >= P.min_detail
    # the alignment found is the one applied
    expect = {"flip": "flip", "flip and shift": "flip, shift", "crop 2 px": "zoom", "crop 1 px": "zoom",
              "shift 1 px": "shift", "shift 2 px": "shift", "roll 1 px": "shift"}.get(how, "aligned")
    assert transform.startswith(expect), (how, transform)


def test_verify_reports_the_shift_in_pixels():
    c = canvas(12)
    assert verify1(crop(c), crop(c, 0, 2))[3] == "shift (2, 0) px"
    assert verify1(crop(c), crop(c, -1, 0))[3] == "shift (0, -1) px"


def test_verify_fails_for_unrelated_smooth_images():
    for s in range(5):
        ok, ncc, _, _ = verify1(crop(canvas(100 + s)), crop(canvas(200 + s)))
        assert not ok and ncc < P.min_ncc


def test_verify_fails_for_flat_ish_images_that_only_share_a_gradient():
    # two photos of plain sky: the same smooth gradient, independent fine texture.  The blurred images
    # correlate like copies; the band-pass detail does not, and that is what rejects the pair.
    rng = np.random.default_rng(5)
    sky = np.linspace(60, 180, 32)[None, :].repeat(32, 0)
    a, b = (np.clip(sky + rng.normal(0, 3, (32, 32)), 0, 255).astype(np.uint8) for _ in range(2))
    ok, ncc, detail, _ = verify1(a, b)
    assert ncc >= P.min_ncc, "the test needs a pair whose shape correlates"
    assert not ok and detail < P.min_detail
    # almost flat grey (std ~3) with independent noise: nothing to align
    a, b = (np.clip(128 + rng.normal(0, 3, (32, 32)), 0, 255).astype(np.uint8) for _ in range(2))
    ok, ncc, detail, _ = verify1(a, b)
    assert not ok and ncc < P.min_ncc


def test_verify_respects_max_shift():
    c = canvas(13, size=48)
    a, b = crop(c), crop(c, 0, 3)
    assert verify1(a, b)[0]
    assert not verify1(a, b, neardup.Params(max_shift=1))[0]


# ---------------------------------------------------------------- verification, one item's work done once
@pytest.mark.parametrize(("n", "matrix"), [(32, align._gauss_matrix(32, 0.7)), (32, align._gauss_matrix(32, 3.0)),
                                           (32, align._zoom_matrix(32, 32 / 30)), (16, align._zoom_matrix(16, 32 / 28)),
                                           (28, align.box_matrix(28, 26)), (16, align.box_matrix(16, 12))])
def test_separable_gives_an_image_the_same_bits_in_any_batch(n, matrix):
    # the per-item caches rest on this: an image computed alone, first, or deep in a batch is the same number
    x = np.random.default_rng(n).uniform(0, 255, (70, n, n)).astype(np.float32)
    whole = align._separable(x, matrix)
    assert all(np.array_equal(align._separable(x[k:k + 1], matrix)[0], whole[k]) for k in (0, 1, 33, 69))
    assert np.array_equal(align._separable(x[5:38], matrix), whole[5:38])


def _verification_set() -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails (originals, flipped/shifted/cropped/brighter copies, flat and identical frames) and pairs
    [P, 3] (i, j, how) over them: every item in several pairs, every ``how``, copies and unrelated pairs."""
    rng = np.random.default_rng(11)
    base = [crop(canvas(500 + s)) for s in range(12)]
    copies = [base[0][:, ::-1], crop(canvas(501), 1, 2), resized(base[2][2:-2, 2:-2]), _brightness(base[3], 1.1),
              np.roll(base[4], 1, axis=0)[:, ::-1], base[5].copy()]
    flat = [np.full((32, 32), 90, np.uint8), np.full((32, 32), 90, np.uint8)]
    th = np.stack(base + copies + flat)
    planted = [(0, 12, 2), (1, 13, 1), (2, 14, 3), (3, 15, 1), (4, 16, 2), (5, 17, 3), (18, 19, 3)]
    i = rng.integers(0, len(th), 150)
    j = (i + rng.integers(1, len(th), 150)) % len(th)
    rand = np.stack([np.minimum(i, j), np.maximum(i, j), rng.integers(1, 4, 150)], axis=1)
    return th, np.concatenate([np.array(planted), rand]).astype(np.int64)


def test_verify_pairs_gives_every_pair_what_verify_gives_it_alone(monkeypatch):
    th, pairs = _verification_set()
    alone = [neardup.verify(th[i][None], th[j][None], P, np.array([h])) for i, j, h in pairs]
    monkeypatch.setattr(align, "_CHUNK", 7)       # pairs and items split across many small batches
    monkeypatch.setattr(align, "_ITEM_BATCH", 5)
    with ThreadPoolExecutor(2) as pool:
        ncc, detail, names = align.verify_pairs(th, pairs, P, pool.map)
    assert np.array_equal(ncc, np.concatenate([a[1] for a in alone]))           # bit for bit
    assert np.array_equal(detail, np.concatenate([a[2] for a in alone]))
    assert names == [a[3][0] for a in alone]
    passed = {tuple(p[:2]) for p, n, d in zip(pairs.tolist(), ncc, detail) if n >= P.min_ncc and d >= P.min_detail}
    assert {(0, 12), (1, 13), (2, 14), (3, 15), (4, 16), (5, 17)} <= passed  # the planted copies, found
    assert (18, 19) not in passed and (ncc[6] == -1 or ncc[6] == 0)         # flat frames: nothing to align


def test_verify_pairs_of_no_pairs():
    ncc, detail, names = align.verify_pairs(np.zeros((3, 32, 32), np.uint8), np.zeros((0, 3), np.int64), P)
    assert ncc.shape == detail.shape == (0,) and names == []


def test_near_duplicates_is_the_same_in_blocks_of_pairs(monkeypatch):
    th, _ = _verification_set()
    th = np.concatenate([th, np.stack([crop(canvas(700 + s)) for s in range(30)])])
    whole = neardup.near_duplicates(th, P, threads=2)
    monkeypatch.setattr(align, "_CACHE_ITEMS", 8)  # the candidates verified four pairs at a time
    blocks = neardup.near_duplicates(th, P, threads=2)
    assert whole.pairs.tolist() == blocks.pairs.tolist() and len(whole.pairs) >= 5
    assert np.array_equal(whole.ncc, blocks.ncc) and np.array_equal(whole.detail, blocks.detail)
    assert whole.transform == blocks.transform


# ---------------------------------------------------------------- candidates
def _random_descriptors(n: int, seed: int = 0) -> np.ndarray:
    d = np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _plant(d: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    d = d.copy()
    d[1500] = d[10] + 0.1 * rng.normal(size=64)                        # found as it is
    d[1700] = neardup.mirrored(d[42:43])[0] + 0.1 * rng.normal(size=64)  # found mirrored
    return np.ascontiguousarray(d / np.linalg.norm(d, axis=1, keepdims=True), dtype=np.float32)


@pytest.mark.parametrize("path", ["exact", "hnsw"])
def test_candidates_find_the_planted_pairs(path, monkeypatch):
    d = _plant(_random_descriptors(2000))
    if path == "hnsw":
        monkeypatch.setattr(neardup, "EXACT_SEARCH_MAX", 500)
    pairs, stats = neardup.candidates(d, P.neighbours, P.min_candidate_similarity)
    assert stats["index"].startswith("exact" if path == "exact" else "HNSW"), stats
    found = {(int(i), int(j)): int(h) for i, j, h in pairs}
    # random 64-d unit vectors are far apart (cosine ~ +-0.13): only the planted pairs pass the floor
    assert set(found) == {(10, 1500), (42, 1700)}, found
    assert found[(10, 1500)] & 1 and found[(42, 1700)] & 2
    assert (pairs[:, 0] < pairs[:, 1]).all()


def test_candidates_of_fewer_than_two_items():
    pairs, _ = neardup.candidates(_random_descriptors(1), 5, 0.75)
    assert pairs.shape == (0, 3)


# ---------------------------------------------------------------- near_duplicates
def test_near_duplicates_finds_copies_and_skips_flat_thumbnails():
    rng = np.random.default_rng(7)
    base = [crop(canvas(300 + s)) for s in range(40)]
    flat = [np.full((32, 32), 128, np.uint8), np.full((32, 32), 128, np.uint8),   # identical blank frames
            np.clip(128 + rng.normal(0, 0.6, (32, 32)), 0, 255).astype(np.uint8), np.zeros((32, 32), np.uint8)]
    copies = [base[3][:, ::-1], resized(base[7][2:-2, 2:-2])]
    th = np.stack(base + flat + copies)
    f = neardup.near_duplicates(th, P, threads=1)
    assert f.stats["flat_items"] == 4 and f.stats["items"] == 46
    assert {tuple(p) for p in f.pairs.tolist()} == {(3, 44), (7, 45)}
    assert f.transform[0].startswith("flip") and f.transform[1].startswith("zoom")
    assert (f.ncc >= P.min_ncc).all() and (f.detail >= P.min_detail).all()
    assert f.stats["verified_pairs"] == 2 and f.stats["candidate_pairs"] >= 2


def test_near_duplicates_of_nothing_and_of_one():
    for n in (0, 1):
        f = neardup.near_duplicates(np.zeros((n, 32, 32), np.uint8) + 9, P)
        assert f.pairs.shape == (0, 2) and f.stats["items"] == n


# ---------------------------------------------------------------- io.read_raw_thumbs
def _part(tmp_path, thumbs: list[bytes] | None, name="part-00000.parquet"):
    d = tmp_path / "raw"
    d.mkdir(exist_ok=True)
    cols = {"id": [f"{k}" for k in range(len(thumbs or [b""]))]}
    if thumbs is not None:
        cols["thumb"] = pa.array(thumbs, pa.binary())
    pq.write_table(pa.table(cols), d / name)
    return d


def test_read_raw_thumbs_reads_every_part_in_order(tmp_path):
    a = [crop(canvas(s)).tobytes() for s in range(3)]
    b = [crop(canvas(s)).tobytes() for s in range(3, 5)]
    _part(tmp_path, a, "part-00000.parquet")
    d = _part(tmp_path, b, "part-00001.parquet")
    t = io.read_raw_thumbs(d)
    assert t.shape == (5, 32, 32) and t.dtype == np.uint8
    assert [x.tobytes() for x in t] == a + b


def test_read_raw_thumbs_names_the_part_without_a_thumb_column(tmp_path):
    d = _part(tmp_path, None)
    with pytest.raises(DataError, match=r"raw/part-00000\.parquet: raw items without the 'thumb' column.*"
                                        r"re-run `keel ingest`"):
        io.read_raw_thumbs(d)


def test_read_raw_thumbs_names_the_part_with_a_wrong_sized_thumb(tmp_path):
    d = _part(tmp_path, [bytes(1024), bytes(1000)])
    with pytest.raises(DataError, match=r"raw/part-00000\.parquet: a 'thumb' value is not 32x32 bytes"):
        io.read_raw_thumbs(d)


def test_spectral_correlation_is_the_window_correlation():
    """The coarse pass's NCC through spectra (a DFT as two matrix products) is the direct window NCC, and the DFT
    is numpy's: to float32 rounding, on random images, a flat window and a lone image."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (9, 16, 16)).astype(np.float32)
    assert np.allclose(align._rfft2(x), np.fft.rfft2(x.astype(np.float64)).transpose(0, 2, 1), atol=2e-3)
    assert np.array_equal(align._rfft2(x[3:4])[0], align._rfft2(x)[3])  # a lone image: the same numbers
    b = rng.uniform(0, 255, (9, 16, 16)).astype(np.float32)
    b[4] = 77.0                                                          # flat: no shape, NCC 0
    r, m = 2, 12
    unit, norm = align._unit_centre(b, r)
    var = align._window_var(x, m)
    direct = align._ncc(x, var, unit, norm, r)
    spectral = align._ncc_spectral(align._spectrum_a(x), var, align._spectrum_b(unit, 16), norm, 16, r)
    assert spectral.shape == direct.shape == (9, 5, 5)
    assert np.abs(spectral - direct).max() < 1e-5 and (spectral[4] == 0).all()
    assert np.array_equal(align._ncc_spectral(align._spectrum_a(x[2:3]), var[2:3], align._spectrum_b(unit[2:3], 16),
                                              norm[2:3], 16, r)[0], spectral[2])


def test_cell_blur_is_the_blur_averaged_over_cells():
    x = np.random.default_rng(4).integers(0, 256, (5, 32, 32)).astype(np.uint8)
    want = align.blur(x.astype(np.float32), 1.0).reshape(5, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.abs(align.cell_blur(x, 1.0, 8) - want).max() < 1e-3
