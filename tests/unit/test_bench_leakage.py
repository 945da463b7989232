"""bench/leakage.py: the planted transforms do what they claim, and the keel report is read by its per-pair contract."""
import io

import numpy as np
import pytest
from PIL import Image

from bench import leakage


def _img(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_translate_is_roll_with_the_edge_repeated(k):
    a = _img()
    want = np.roll(a, k, axis=1)
    want[:, :k] = a[:, :1]
    assert np.array_equal(leakage.translate(a, k), want)
    down = np.roll(a, k, axis=0)
    down[:k] = a[:1]
    assert np.array_equal(leakage.translate(a, 0, k), down)


def test_flip_and_crop_resize():
    a = _img(1)
    assert np.array_equal(leakage.hflip(a), a[:, ::-1])
    for where in ("sides", "corner"):
        for k in (2, 4):
            out = leakage.crop_resize(a, k, where)
            assert out.shape == a.shape and out.dtype == np.uint8
    flat = np.full((32, 32, 3), 77, np.uint8)
    assert np.array_equal(leakage.crop_resize(flat, 4), flat)
    # "sides" zooms on the centre: a frame 4 px wide around a flat centre disappears
    framed = flat.copy()
    framed[:4], framed[-4:], framed[:, :4], framed[:, -4:] = 0, 0, 0, 0
    assert np.array_equal(leakage.crop_resize(framed, 4, "sides"), flat)


def test_photometric_transforms():
    a = _img(2)
    assert np.abs(leakage.brightness(a, 1.1).astype(int) - np.clip(a * 1.1, 0, 255)).max() <= 1
    assert np.array_equal(leakage.grey_tint(a, 0.2), np.rint(0.8 * a.astype(np.float32) + 0.2 * 128).astype(np.uint8))
    g = leakage.desaturate(a, 1.0)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert leakage.contrast(a, 1.5).std() > a.std()


def test_plants_byte_copy_and_encoded_copies():
    kinds = {p.kind for p in leakage.PLANTS}
    assert {"exact", "jpeg", "brightness", "contrast", "grey_tint", "translate", "crop", "flip"} <= kinds
    assert len({(p.kind, p.strength) for p in leakage.PLANTS}) == len(leakage.PLANTS)
    buf = io.BytesIO()
    Image.fromarray(_img(3)).save(buf, format="JPEG", quality=75)
    data = buf.getvalue()
    for p in leakage.PLANTS:
        out = p.apply(data)
        if p.kind == "exact":
            assert out == data
        else:
            img = Image.open(io.BytesIO(out))
            assert img.format == "JPEG" and img.size == (32, 32)
    flip = next(p for p in leakage.PLANTS if (p.kind, p.strength) == ("flip", "h"))
    assert np.abs(leakage.decode(flip.apply(data)).astype(int) - leakage.decode(data)[:, ::-1]).mean() < 8


def _side(uri, split):
    return {"id": uri, "uri": uri, "source_split": split, "split": split, "label": "cat"}


def test_keel_pairs_reads_the_per_pair_contract(tmp_path):
    (tmp_path / "train").mkdir()
    test_f, train_f, other = tmp_path / "test" / "1.jpg", tmp_path / "train" / "2.jpg", tmp_path / "train" / "3.jpg"
    report = {"pairs": [
        {"check": "near", "score": 3, "a": _side(f"file://{test_f}", "test"), "b": _side("train/2.jpg", "train")},
        {"check": "exact_pixels", "score": None, "a": _side(str(train_f), "train"), "b": _side(str(test_f), "test")},
        {"check": "near", "score": 2, "a": _side(str(train_f), "train"), "b": _side(str(other), "train")},
    ]}
    pairs = leakage.keel_pairs(report, tmp_path, "leakage.json")
    assert len(pairs) == 1  # the two checks of one pair merge; the train-train pair is not cross-split
    (p,) = pairs
    assert (p.test, p.train, p.checks, p.score) == (str(test_f.resolve()), str(train_f.resolve()),
                                                   {"near", "exact_pixels"}, 3.0)
    with pytest.raises(leakage.ReportFormatError, match="no 'pairs' list"):
        leakage.keel_pairs({"cross_split_items": []}, tmp_path, "leakage.json")


def test_score_method_counts_only_a_link_to_its_own_original():
    truth = {"files": {"T1": {"planted": True}, "T2": {"planted": True}, "R": {"planted": False},
                       "A": {"planted": False}, "B": {"planted": False}, "C": {"planted": False}},
             "planted": [{"test": "T1", "original": "A", "kind": "k", "strength": "s"},
                         {"test": "T2", "original": "B", "kind": "k", "strength": "s"}]}
    F = leakage.Flagged
    s = leakage.score_method(truth, [F("T1", "A", {"near"}, 1.0), F("T2", "C", {"near"}, 2.0),
                                     F("R", "C", {"near"}, 4.0)])
    assert (s["planted_found"], s["flagged_cross_split_pairs"], s["flagged_planted_to_another_train_image"],
            s["flagged_unplanted"]) == (1, 3, 1, 1)
    assert s["precision_strict"] == pytest.approx(1 / 3, abs=1e-4) and s["per_kind"]["k"]["recall"] == 0.5
