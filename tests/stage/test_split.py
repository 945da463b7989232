"""split: stability, duplicates never straddle, source split honoured, policies, frozen means frozen, the
independent leakage check, the leakage report.

Near duplicates are real thumbnails: smooth random pictures (blurred noise, photo-like scales) and copies of them
moved by a pixel or two, flipped, cropped by 2 px and resized back, or made 10 % brighter.  Stage tests write real
raw parts (PNG bytes, features and thumbnails made as ingest makes them) into a temporary folder.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import split
from tasks.core import io, neardup
from tasks.core.config import NearDupConfig, SplitConfig
from tasks.core.imaging import decode, feature_pixels, features, to_gray
from tasks.split import report as report_mod
from tasks.split.stage import params_of
from tests.conftest import encode
from tests.support.pictures import canvas, crop

P = neardup.Params()


# ---------------------------------------------------------------- pictures
def picture(seed: int) -> np.ndarray:
    return crop(canvas(seed))


# one near-duplicate copy of the picture of ``seed`` per transform
TRANSFORMS = {
    "shift 1,1 px": lambda s: crop(canvas(s), 1, 1),
    "roll 1 px": lambda s: np.ascontiguousarray(np.roll(picture(s), 1, axis=1)),
    "flip": lambda s: np.ascontiguousarray(picture(s)[:, ::-1]),
    "flip + shift": lambda s: np.ascontiguousarray(crop(canvas(s), -1, 0)[:, ::-1]),
    "crop 2 px": lambda s: np.asarray(Image.fromarray(picture(s)[2:-2, 2:-2]).resize((32, 32),
                                                                                    Image.Resampling.BILINEAR)),
    "brightness +10%": lambda s: np.clip(picture(s) * 1.1, 0, 255).astype(np.uint8),
}
KINDS = list(TRANSFORMS)


def copy_of(seed: int, k: int = 0) -> np.ndarray:
    return TRANSFORMS[KINDS[k % len(KINDS)]](seed)


# ---------------------------------------------------------------- in-memory metadata
def meta(n, seed=0, groups=None, source_split=None, phash=None, pixel=None, labels=None, start=0, side=32,
         ids=None):
    rng = np.random.default_rng(seed)
    ids = ids or [f"{start + i:064x}" for i in range(n)]
    return pa.table({
        "id": ids,
        "label": labels or [str(i % 3) for i in range(n)],
        "source_uri": [f"f/{start + i}.png" for i in range(n)],
        "group": pa.array(groups or [None] * n, pa.string()),
        "source_split": pa.array(source_split or [None] * n, pa.string()),
        "pixel_sha": pixel or [f"px{start + i}" for i in range(n)],
        "phash": pa.array(phash if phash is not None else rng.integers(0, 2**63, n).astype(np.uint64), pa.uint64()),
        "width": pa.array(side if isinstance(side, list) else [side] * n, pa.int32()),
        "height": pa.array(side if isinstance(side, list) else [side] * n, pa.int32()),
    })


def thumbs_of(pictures: list[np.ndarray]) -> np.ndarray:
    return neardup.thumbs_array([neardup.thumbnail(p) for p in pictures])


DEFAULT = SplitConfig()


def link(m, thumbs, cfg: SplitConfig = DEFAULT):
    nd = cfg.near_duplicates
    return split.find(m, thumbs, params_of(cfg), nd.min_side, nd.phash_max_distance)


def assign(m, thumbs=None, cfg: SplitConfig = DEFAULT, frozen=None):
    links = link(m, thumbs, cfg)
    table, decisions = split.assign(m, cfg, links.units(), frozen or {})
    return table, decisions, links


def splits_of(table):
    return dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))


def frozen_of(table):
    return {i: (s, r) for i, s, r in zip(table.column("id").to_pylist(), table.column("split").to_pylist(),
                                         table.column("reason").to_pylist())}


def pairs_of(links):
    return {tuple(sorted(p)) for p in links.near.tolist()}


# ---------------------------------------------------------------- raw parts on disk, made as ingest makes them
def raw_row(uri: str, pixels: np.ndarray, group: str | None = None) -> dict:
    """``<split>/<label>/<name>`` (or ``<label>/<name>``) -> a raw-items row with PNG bytes and a thumbnail."""
    parts = uri.split("/")
    src, label = (parts[0], parts[1]) if len(parts) == 3 else (None, parts[0])
    data = encode(pixels)
    d = decode(data, max_pixels=10**8)
    gray = to_gray(feature_pixels(d.pixels))
    brightness, contrast, pixel_sha, ph = features(d.pixels, gray)
    return {"id": hashlib.sha256(data).hexdigest(), "image": data, "label": label, "source_uri": uri,
            "group": group, "source_split": src, "format": d.format, "width": d.width, "height": d.height,
            "mode": d.mode, "channels": d.channels, "brightness": brightness, "contrast": contrast,
            "pixel_sha": pixel_sha, "phash": ph, "thumb": neardup.thumbnail(gray)}


def write_raw(paths, rows: list[dict], rejects: list[dict] = ()) -> dict[str, str]:
    """Replace the raw items (two parts, as a re-ingest would) and the rejects; returns uri -> id."""
    d = Path(paths.raw_items)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    half = max(1, len(rows) // 2)
    for k, chunk in enumerate((rows[:half], rows[half:])):
        if chunk:
            pq.write_table(pa.Table.from_pylist(chunk, schema=io.RAW_SCHEMA), d / f"part-{k:05d}.parquet")
    full = [{"label": None, "detail": "", "source_split": None, "duplicate_of": None, **r} for r in rejects]
    io.write_table(paths.rejects, pa.Table.from_pylist(full, schema=io.REJECT_SCHEMA) if full
                   else io.REJECT_SCHEMA.empty_table())
    return {r["source_uri"]: r["id"] for r in rows}


def manifest(paths) -> dict[str, tuple[str, str | None, str]]:
    t, _ = io.read_manifest(paths.split_manifest)
    return {r["id"]: (r["split"], r["reason"], r["unit"]) for r in t.to_pylist()}


def leakage(paths) -> dict:
    return json.loads(Path(paths.leakage_report).read_text())


def unrelated(prefix: str, n: int, seed: int, labels=("cat", "dog")) -> list[dict]:
    return [raw_row(f"{prefix}/{labels[k % len(labels)]}/{prefix}-{seed}-{k}.png", picture(seed + k))
            for k in range(n)]


# ================================================================ assignment
def test_fractions_are_respected():
    t, _, _ = assign(meta(5000))
    s = list(splits_of(t).values())
    assert abs(s.count("train") / 5000 - 0.8) < 0.03
    assert abs(s.count("val") / 5000 - 0.1) < 0.02
    assert abs(s.count("test") / 5000 - 0.1) < 0.02
    t, _, _ = assign(meta(5000), cfg=SplitConfig(fractions={"train": 0.5, "val": 0.2, "test": 0.3}))
    s = list(splits_of(t).values())
    assert abs(s.count("train") / 5000 - 0.5) < 0.03 and abs(s.count("test") / 5000 - 0.3) < 0.03


def test_adding_data_never_moves_an_existing_item():
    a = meta(2000, seed=1)
    b = meta(1000, seed=2, start=2000)
    before = splits_of(assign(a)[0])
    # pure function of (unit key, seed): even without the frozen manifest nothing moves
    after = splits_of(assign(pa.concat_tables([a, b]))[0])
    assert all(after[i] == s for i, s in before.items())
    # and a different seed does move items (the test can fail)
    other = splits_of(assign(a, cfg=SplitConfig(seed=7))[0])
    assert sum(other[i] != s for i, s in before.items()) > 100


def test_frozen_units_keep_their_split_when_a_new_item_joins():
    n = 300
    pics = [picture(1000 + i) for i in range(n)]
    a = meta(n, start=1000)
    first, _, links = assign(a, thumbs_of(pics))
    assert pairs_of(links) == set()  # 300 unrelated pictures: no near duplicate among them
    frozen = frozen_of(first)
    old17 = f"{1017:064x}"
    # a flipped copy of item 17 arrives later, with an id that sorts before 17's: the unit's key (its smallest id)
    # changes, so without the freeze the unit would be drawn again.  Pick an id whose draw moves it.
    th = thumbs_of(pics + [copy_of(1017, 2)])
    links = link(pa.concat_tables([a, meta(1, start=n)]), th)
    assert pairs_of(links) == {(17, n)}
    for k in range(1000):
        new_id = f"{k:064x}"
        both = pa.concat_tables([a, meta(1, start=k, ids=[new_id])])
        unfrozen = splits_of(split.assign(both, SplitConfig(), links.units(), {})[0])
        if unfrozen[old17] != frozen[old17][0]:
            break
    else:
        pytest.fail("no id found whose draw differs: the test could not fail")
    t, decisions, links = assign(both, th, frozen=frozen)
    s = frozen_of(t)
    assert all(s[i] == v for i, v in frozen.items())
    assert s[new_id] == (frozen[old17][0], f"joins frozen {frozen[old17][0]} unit") and decisions == []


def test_a_new_item_bridging_two_frozen_splits_is_left_out():
    # z lies between t and x: 2 px from each, 4 px between them (beyond max_shift 2: t and x are not linked)
    cfg = SplitConfig(near_duplicates=NearDupConfig(max_shift=2))
    c = canvas(906, size=44)
    t_pic, x_pic, z_pic = crop(c, 0, 2), crop(c, 0, -2), crop(c)
    first_m = meta(2, source_split=["test", "train"])
    first, _, links = assign(first_m, thumbs_of([t_pic, x_pic]), cfg)
    assert pairs_of(links) == set()
    assert splits_of(first) == {f"{0:064x}": "test", f"{1:064x}": "train"}
    both = pa.concat_tables([first_m, meta(1, start=2)])
    t, _, links = assign(both, thumbs_of([t_pic, x_pic, z_pic]), cfg, frozen_of(first))
    assert pairs_of(links) == {(0, 2), (1, 2)}
    rows = t.to_pylist()
    assert [r["split"] for r in rows] == ["test", "train", "excluded"]
    assert rows[2]["reason"] == "near duplicate bridging frozen splits ['train', 'test']"
    assert split.check(t, both, links) == []
    # the bridge touches the frozen test split: it is a cross-split decision the policy sees (fail stops on it)
    _, decisions, _ = assign(both, thumbs_of([t_pic, x_pic, z_pic]), cfg, frozen_of(first))
    assert [(d["id"], d["split"], d["partner_split"]) for d in decisions] == [(f"{2:064x}", "excluded", "test")]


def test_a_frozen_train_item_the_source_now_calls_test_is_reported():
    m = meta(3, source_split=["train", "train", "train"])
    first, _, _ = assign(m)
    fz = frozen_of(first)
    later = m.set_column(m.schema.get_field_index("source_split"), "source_split",
                         pa.array(["test", "train", "train"]))  # the same bytes now also come from test/
    t, decisions, _ = assign(later, frozen=fz)
    assert splits_of(t) == splits_of(first)  # frozen: nothing moves
    assert [d["id"] for d in decisions] == [f"{0:064x}"]
    assert "source-test item frozen in" in decisions[0]["reason"] and "--refreeze" in decisions[0]["reason"]


def test_exact_and_near_duplicates_and_groups_stay_together():
    n = 600
    pics = [picture(2000 + i) for i in range(n)]
    pixel = [f"px{i}" for i in range(n + 120)]
    groups = [None] * (n + 120)
    near = [(i, n + i) for i in range(120)]                 # 120 near duplicates, 20 of each transform
    pics += [copy_of(2000 + i, i) for i in range(120)]
    for i in range(120, 240, 2):                            # exact duplicates (other encodings, same pixels)
        pixel[i + 1] = pixel[i]
    for i in range(240, 340):                               # caller groups of 10
        groups[i] = f"patient-{i // 10}"
    # a chain: near (340 ~ copy 720) + same pixels (720 = 341) + group (341, 342)
    pics.append(copy_of(2340, 1))
    pixel.append(pixel[341])
    groups.append(None)
    groups[341] = groups[342] = "chain"
    m = meta(n + 121, pixel=pixel, groups=groups)
    t, decisions, links = assign(m, thumbs_of(pics))
    assert pairs_of(links) == set(near) | {(340, 720)}, "every planted copy is found, and nothing else"
    assert len(links.exact_pixels) == 61 and len(links.group) == 90 + 1
    s = t.column("split").to_pylist()
    for kind in range(len(KINDS)):
        assert all(s[i] == s[j] for i, j in near[kind::len(KINDS)]), KINDS[kind]
    assert all(s[i] == s[i + 1] for i in range(120, 240, 2))
    for g in range(24, 34):
        assert len({s[i] for i in range(g * 10, g * 10 + 10)}) == 1
    assert len({s[i] for i in (340, 720, 341, 342)}) == 1
    unit = t.column("unit").to_pylist()
    assert unit[340] == unit[720] == unit[341] == unit[342] == "group:chain"
    assert split.check(t, m, links) == [] and decisions == []
    # the pairs really are spread over the splits: the test could catch a unit torn apart
    assert len({s[i] for i, _ in near}) == 3


# large photos: a 384 px window of a smooth 480 px canvas; near-duplicate copies as a user's folder has them
BIG = {
    "shift 12 px": lambda c: crop(c, 12, 12, 384),
    "flip": lambda c: np.ascontiguousarray(crop(c, s=384)[:, ::-1]),
    "crop 5 % and resized back": lambda c: np.asarray(Image.fromarray(crop(c, s=384)[20:-20, 20:-20]).resize(
        (384, 384), Image.Resampling.BICUBIC)),
    "half size": lambda c: np.asarray(Image.fromarray(crop(c, s=384)).resize((192, 192), Image.Resampling.LANCZOS)),
    "brightness +10 %": lambda c: np.clip(crop(c, s=384) * 1.1, 0, 255).astype(np.uint8),
}


def test_large_photos_near_duplicates_are_found_from_the_feature_copy(paths, tmp_path):
    """ingest reads a large image's perceptual features from its box-reduced copy (imaging.feature_pixels): the
    real ingest on 384 px JPEGs, then split's search, still finds every planted copy and nothing else."""
    from tasks import ingest
    from tasks.core.config import IngestConfig

    src = tmp_path / "photos"
    n, kinds = 60, list(BIG)
    canvases = [canvas(7000 + i, size=480, sigma=30.0) for i in range(n)]
    planted = set()
    for k in range(3):
        (src / str(k)).mkdir(parents=True)
    for i, c in enumerate(canvases):
        Image.fromarray(crop(c, s=384)).save(src / str(i % 3) / f"{i:03d}.jpg", quality=90)
        if i < 2 * len(kinds):  # two copies of each kind, in the other classes' folders (labels do not matter)
            kind = kinds[i % len(kinds)]
            Image.fromarray(BIG[kind](c)).save(src / str((i + 1) % 3) / f"{i:03d}-copy.jpg", quality=90)
            planted.add((f"{i % 3}/{i:03d}.jpg", f"{(i + 1) % 3}/{i:03d}-copy.jpg", kind))
    ingest.run(IngestConfig(source=str(src), workers=1), paths)
    m = io.read_raw_meta(paths.raw_items)
    uris = [u.split("photos/")[-1] for u in m.column("source_uri").to_pylist()]
    assert set(m.column("width").to_pylist()) == {192, 384}  # the stored size, not the feature copy's
    links = link(m, io.read_raw_thumbs(paths.raw_items))
    found = {tuple(sorted((uris[a], uris[b]))) for a, b in links.near.tolist()}
    missed = [kind for a, b, kind in planted if tuple(sorted((a, b))) not in found]
    assert not missed, missed
    assert len(found) == len(planted), found - {tuple(sorted((a, b))) for a, b, _ in planted}


def test_small_images_use_the_phash_check():
    rng = np.random.default_rng(3)
    ph = rng.integers(0, 2**63, 10).astype(np.uint64)
    small = [np.kron(rng.integers(0, 256, (4, 4)), np.ones((2, 2))).astype(np.uint8) for _ in range(4)]
    pics = [neardup.thumbs_array([neardup.thumbnail(p)])[0] for p in small]
    pics[3] = pics[2]                                   # 2 ~ 3: identical thumbnails, pHash far apart
    ph[1] = ph[0] ^ np.uint64(0b101)                    # 0 ~ 1: pHash 2 bits apart, unrelated pictures
    ph[5] = ph[4]                                       # 4 ~ 5: 32 px, same pHash, unrelated pictures
    pics += [picture(3004), picture(3005), picture(3006), copy_of(3006, 2)]  # 6 ~ 7: 32 px near duplicates
    ph[9] = ph[8] ^ np.uint64(0b11111)                  # 8 ~ 9: 8 x 40 px (small), pHash 5 bits apart
    pics += [picture(3008), picture(3009)]
    side = [8, 8, 8, 8, 32, 32, 32, 32, 8, 8]
    m = meta(10, phash=ph, side=side)
    links = link(m, np.stack(pics))
    assert pairs_of(links) == {(0, 1), (6, 7)}
    k = {tuple(sorted(p)): j for j, p in enumerate(links.near.tolist())}
    assert re.fullmatch(r"pHash (Hamming )?distance 2 \((image )?under 16 px\)", links.near_transform[k[(0, 1)]])
    assert np.isnan(links.near_ncc[k[(0, 1)]]) and links.near_ncc[k[(6, 7)]] >= P.min_ncc
    assert links.stats["small_items"] == 6 and links.stats["min_side"] == 16
    # the floor is a setting: 5 bits apart are linked at phash_max_distance 5
    cfg = SplitConfig(near_duplicates=NearDupConfig(phash_max_distance=5))
    assert (8, 9) in pairs_of(link(m, np.stack(pics), cfg))
    # and min_side decides which check an image gets: at min_side 8 the 8 px images take the aligned one
    cfg = SplitConfig(near_duplicates=NearDupConfig(min_side=8))
    assert (2, 3) in pairs_of(link(m, np.stack(pics), cfg))


def test_no_thumbnails_means_no_near_duplicate_search():
    links = link(meta(10), None)
    assert len(links.near) == 0 and links.stats == {"near_duplicate_search": "off"}


def test_source_test_split_is_honoured_and_val_carved_from_train():
    n = 2000
    src = ["test" if i % 5 == 0 else "train" for i in range(n)]
    t, _, _ = assign(meta(n, source_split=src), cfg=SplitConfig(val_fraction_of_train=0.2))
    s = list(t.column("split").to_pylist())
    assert all((s[i] == "test") == (src[i] == "test") for i in range(n))
    val_share = s.count("val") / src.count("train")
    assert abs(val_share - 0.2) < 0.04
    # a source val split is honoured too
    src3 = ["test" if i % 5 == 0 else "val" if i % 5 == 1 else "train" for i in range(n)]
    s3 = assign(meta(n, source_split=src3))[0].column("split").to_pylist()
    assert all(a == b for a, b in zip(s3, src3) if b != "train")
    # and ignored when honour_source_split is off: the fractions decide
    s_off = assign(meta(n, source_split=src), cfg=SplitConfig(honour_source_split=False))[0].column("split")
    s_off = s_off.to_pylist()
    assert abs(s_off.count("test") / n - 0.1) < 0.03 and s_off != s


def _cross(policy, n=200):
    pics = [picture(4000 + i) for i in range(n)]
    pics[1] = copy_of(4000, 3)                          # item 1 (train) is a flipped, shifted copy of item 0 (test)
    src = ["test"] + ["train"] * (n - 1)
    return meta(n, source_split=src), thumbs_of(pics), SplitConfig(cross_split_duplicates=policy)


def test_cross_split_policy_drop_from_train():
    m, th, cfg = _cross("drop_from_train")
    t, decisions, links = assign(m, th, cfg)
    assert pairs_of(links) == {(0, 1)}
    rows = t.to_pylist()
    assert rows[0]["split"] == "test"
    assert rows[1]["split"] == "excluded"
    assert rows[1]["reason"] == "near duplicate of a source test item (dropped from train)"
    assert [(d["id"], d["partner_id"], d["split"], d["partner_split"]) for d in decisions] == \
        [(f"{1:064x}", f"{0:064x}", "excluded", "test")]
    assert split.check(t, m, links) == []


def test_cross_split_policy_move_to_test():
    m, th, cfg = _cross("move_to_test")
    t, decisions, _ = assign(m, th, cfg)
    rows = t.to_pylist()
    assert rows[0]["split"] == rows[1]["split"] == "test"
    assert rows[1]["reason"] == "near duplicate of a source test item (moved to test)"
    assert len(decisions) == 1 and decisions[0]["split"] == "test"


def test_cross_split_policy_fail_names_both_files(paths):
    rows = [raw_row("test/cat/original.png", picture(4100)), raw_row("train/cat/flipped-copy.png", copy_of(4100, 3))]
    rows += unrelated("train", 20, 4200) + unrelated("test", 5, 4300)
    write_raw(paths, rows)
    with pytest.raises(split.LeakageError) as info:
        split.run(SplitConfig(cross_split_duplicates="fail"), paths)
    msg = str(info.value)
    assert msg.startswith("1 item(s) are duplicates across the source's splits and split.cross_split_duplicates=fail")
    assert "  train/cat/flipped-copy.png (train) ~ test/cat/original.png\n" in msg
    assert str(paths.leakage_report) in msg and str(paths.leakage_picture) in msg
    report = leakage(paths)
    assert report["passed"] is False and len(report["cross_split_items"]) == 1
    assert report["cross_split_items"][0]["uri"] == "train/cat/flipped-copy.png"
    assert report["cross_split_items"][0]["partner_uri"] == "test/cat/original.png"
    assert Path(paths.leakage_picture).exists()
    assert not Path(paths.split_manifest).exists()


# ================================================================ frozen means frozen
def _leaky_dataset():
    """Two cross-split near duplicates (train copies of test items) among unrelated train and test items."""
    rows = [raw_row("test/cat/t0.png", picture(5000)), raw_row("train/cat/a0.png", copy_of(5000, 3)),
            raw_row("test/dog/t1.png", picture(5001)), raw_row("train/dog/a1.png", copy_of(5001, 5))]
    return rows + unrelated("train", 30, 5100) + unrelated("test", 10, 5200)


def _newcomers(prefix_seed: int):
    """Unrelated new items, train and test."""
    return unrelated("train", 10, prefix_seed) + unrelated("test", 4, prefix_seed + 50)


def _near_frozen():
    """New items that are near duplicates of a frozen test item (t0) and of a frozen train copy (a0)."""
    a0 = copy_of(5000, 3)
    return [raw_row("train/cat/n-of-t0.png", copy_of(5000, 4)),                              # ~ t0 (test)
            raw_row("train/cat/n-of-a0.png", np.clip(a0 * 1.1, 0, 255).astype(np.uint8)),   # ~ a0
            raw_row("test/cat/n-test-of-a0.png", np.ascontiguousarray(np.roll(a0, 1, axis=0)))]  # ~ a0, test


def _assert_kept(before: dict, after: dict) -> None:
    lost = {i: (v[:2], after.get(i, (None, None))[:2]) for i, v in before.items() if after.get(i, (0, 0))[:2] != v[:2]}
    assert not lost, f"frozen ids moved (id: (before, after)): {lost}"


@pytest.mark.parametrize("policy, a0_split, a0_reason, newcomer", [
    ("drop_from_train", "excluded", "near duplicate of a source test item (dropped from train)",
     ("excluded", "near duplicate of a frozen test item (dropped from train)")),
    ("move_to_test", "test", "near duplicate of a source test item (moved to test)",
     ("test", "near duplicate of a frozen test item (moved to test)")),
], ids=["drop_from_train", "move_to_test"])
def test_frozen_means_frozen(paths, policy, a0_split, a0_reason, newcomer):
    cfg = SplitConfig(cross_split_duplicates=policy)
    rows = _leaky_dataset()
    ids = write_raw(paths, rows)
    split.run(cfg, paths)
    first = manifest(paths)
    t0, a0 = ids["test/cat/t0.png"], ids["train/cat/a0.png"]
    assert first[t0][:2] == ("test", None) and first[a0][:2] == (a0_split, a0_reason)
    assert first[ids["train/dog/a1.png"]][:2] == (a0_split, a0_reason)
    sha = io.sha256_file(paths.split_manifest)

    # (a) unchanged: the same manifest, byte for byte
    split.run(cfg, paths)
    assert manifest(paths) == first and io.sha256_file(paths.split_manifest) == sha
    assert leakage(paths)["frozen_ids_kept"] == len(rows)

    # (b) new unrelated data
    rows += _newcomers(5300)
    write_raw(paths, rows)
    split.run(cfg, paths)
    second = manifest(paths)
    _assert_kept(first, second)
    assert len(second) == len(rows)

    # (c) new near duplicates of a frozen test item and of the frozen copy (excluded or moved to test)
    new = _near_frozen()
    ids = write_raw(paths, rows + new)
    split.run(cfg, paths)
    third = manifest(paths)
    _assert_kept(second, third)
    _assert_kept(first, third)
    assert {third[ids[r["source_uri"]]][2] for r in new} == {third[t0][2]}, "the newcomers join t0's unit"
    assert third[ids["train/cat/n-of-t0.png"]][:2] == newcomer
    assert third[ids["train/cat/n-of-a0.png"]][:2] == newcomer
    assert third[ids["test/cat/n-test-of-a0.png"]][:2] == ("test", "joins frozen test unit")
    report = leakage(paths)
    assert report["passed"] and report["problems"] == []
    assert {d["id"] for d in report["cross_split_items"]} == {ids["train/cat/n-of-t0.png"],
                                                             ids["train/cat/n-of-a0.png"]}


def test_frozen_means_frozen_fail(paths):
    cfg = SplitConfig(cross_split_duplicates="fail")
    rows = _leaky_dataset()
    write_raw(paths, rows)
    # the first run stops, names both files of each pair, and writes no manifest
    with pytest.raises(split.LeakageError) as info:
        split.run(cfg, paths)
    msg = str(info.value)
    assert msg.startswith("2 item(s) are duplicates across the source's splits")
    assert "  train/cat/a0.png (train) ~ test/cat/t0.png\n" in msg
    assert "  train/dog/a1.png (train) ~ test/dog/t1.png\n" in msg
    assert not Path(paths.split_manifest).exists()

    # the copies removed from the source: the split is made and frozen
    rows = [r for r in rows if r["source_uri"] not in ("train/cat/a0.png", "train/dog/a1.png")]
    ids = write_raw(paths, rows)
    split.run(cfg, paths)
    first = manifest(paths)
    sha = io.sha256_file(paths.split_manifest)

    split.run(cfg, paths)                                                     # (a) unchanged
    assert manifest(paths) == first and io.sha256_file(paths.split_manifest) == sha

    rows += _newcomers(5400)                                                  # (b) new unrelated data
    write_raw(paths, rows)
    split.run(cfg, paths)
    second = manifest(paths)
    _assert_kept(first, second)
    sha = io.sha256_file(paths.split_manifest)

    # (c) a new train item that is a near duplicate of a frozen test item: the stage stops, the manifest stays
    ids = write_raw(paths, rows + [raw_row("train/cat/late-copy-of-t0.png", copy_of(5000, 4))])
    with pytest.raises(split.LeakageError) as info:
        split.run(cfg, paths)
    assert "  train/cat/late-copy-of-t0.png (train) ~ test/cat/t0.png\n" in str(info.value)
    assert io.sha256_file(paths.split_manifest) == sha and manifest(paths) == second
    assert ids["test/cat/t0.png"] in second


@pytest.mark.parametrize("policy", ["drop_from_train", "move_to_test", "fail"])
def test_frozen_exclusions_are_kept_by_assign_under_every_policy(policy):
    # the frozen manifest holds exclusions (made with drop_from_train); the rules keep them whatever the policy:
    # an excluded item never joins test as "joins frozen test unit" (the bug of the first version)
    n = 60
    pics = [picture(6000 + i) for i in range(n)]
    pics[1] = copy_of(6000, 3)                                  # 1 (train) ~ 0 (test)
    pics[2] = copy_of(6000, 5)                                  # 2 (train) ~ 0 (test) too
    src = ["test"] + ["train"] * (n - 11) + ["test"] * 10
    m = meta(n, source_split=src)
    made, _, links = assign(m, thumbs_of(pics), SplitConfig(cross_split_duplicates="drop_from_train"))
    assert pairs_of(links) >= {(0, 1), (0, 2)}
    frozen = frozen_of(made)
    assert frozen[f"{1:064x}"] == ("excluded", "near duplicate of a source test item (dropped from train)")
    cfg = SplitConfig(cross_split_duplicates=policy)

    again, decisions, _ = assign(m, thumbs_of(pics), cfg, frozen)             # (a) unchanged
    assert frozen_of(again) == frozen and decisions == []

    more = pa.concat_tables([m, meta(20, start=n, source_split=["train"] * 15 + ["test"] * 5)])
    more_pics = pics + [picture(6100 + i) for i in range(20)]
    t, decisions, _ = assign(more, thumbs_of(more_pics), cfg, frozen)         # (b) new unrelated data
    assert all(frozen_of(t)[i] == v for i, v in frozen.items()) and decisions == []

    # (c) new: a train copy of frozen test item 0, a train and a test copy of frozen excluded item 1
    newest = pa.concat_tables([m, meta(3, start=n, source_split=["train", "train", "test"])])
    c1 = copy_of(6000, 3)
    newest_pics = pics + [copy_of(6000, 2), np.clip(c1 * 1.1, 0, 255).astype(np.uint8),
                          np.ascontiguousarray(np.roll(c1, 1, axis=1))]
    t, decisions, links = assign(newest, thumbs_of(newest_pics), cfg, frozen)
    assert pairs_of(links) >= {(0, n), (1, n + 1), (1, n + 2)}
    got = frozen_of(t)
    assert all(got[i] == v for i, v in frozen.items()), {i: (v, got[i]) for i, v in frozen.items() if got[i] != v}
    new_ids = [f"{n + k:064x}" for k in range(3)]
    want = "test" if policy == "move_to_test" else "excluded"
    assert [got[i][0] for i in new_ids] == [want, want, "test"]
    assert got[new_ids[2]][1] == "joins frozen test unit"
    # under fail the stage raises on these decisions (after writing the report)
    assert sorted(d["id"] for d in decisions) == new_ids[:2]
    assert split.check(t, newest, links) == []


def test_frozen_test_item_keeps_its_split_even_when_a_new_link_crosses(paths):
    # detector settings may change; frozen ids never move: a link the new settings reveal fails the check, by name
    c = canvas(7000, size=44)
    rows = [raw_row("test/cat/a.png", crop(c)), raw_row("train/cat/b.png", crop(c, 0, 3))]
    rows += unrelated("train", 12, 7100) + unrelated("test", 4, 7200)
    write_raw(paths, rows)
    strict = SplitConfig(near_duplicates=NearDupConfig(max_shift=1))
    split.run(strict, paths)
    first = manifest(paths)
    assert leakage(paths)["links"]["near"] == 0
    loose = SplitConfig(near_duplicates=NearDupConfig(max_shift=3, min_candidate_similarity=0.3))
    with pytest.raises(split.LeakageError, match=r"(?s)leakage check failed: 1 cross-split link\(s\):\n  near duplicate "
                                                 r"\(verified\): test/cat/a\.png \(test, id .*\) ~ train/cat/b\.png \(train, "
                                                 r".*frozen ids never move.*--refreeze"):
        split.run(loose, paths)
    assert manifest(paths) == first


# ================================================================ the independent check
def test_leakage_check_catches_a_bad_manifest():
    pics = [picture(8000 + i) for i in range(8)]
    pics[5] = copy_of(8004, 2)
    m = meta(8, pixel=["a", "a", "b", "c", "d", "e", "f", "f"], groups=[None, None, "g", "g", None, None, None, None])
    links = link(m, thumbs_of(pics))
    assert pairs_of(links) == {(4, 5)}
    ok = pa.table({"id": m.column("id"), "label": m.column("label"),
                   "split": ["train", "train", "val", "val", "test", "test", "train", "excluded"],
                   "unit": ["u"] * 8, "reason": [None] * 8}, schema=io.MANIFEST_SCHEMA)
    assert split.check(ok, m, links) == []  # a link to an excluded item (6 ~ 7) is no leak
    bad = ok.set_column(2, "split", pa.array(["train", "test", "train", "val", "val", "test", "train", "excluded"]))
    problems = split.check(bad, m, links)
    assert len(problems) == 3, problems
    assert any(p.startswith("exact duplicate (same pixels) (pixel_sha a)") and "f/0.png (train" in p
               and "f/1.png (test" in p for p in problems)
    assert any(p.startswith("same group (group g)") and "f/2.png (train" in p and "f/3.png (val" in p for p in problems)
    assert any(p.startswith("near duplicate (verified): f/4.png (val") and "f/5.png (test" in p for p in problems)
    dup_ids = pa.concat_tables([ok, ok.slice(0, 1)])
    assert any("appears more than once" in p for p in split.check(dup_ids, m, links))
    assert split.check(ok.slice(0, 7), m, links) == ["f/7.png: raw item has no row in the manifest"]


@pytest.mark.parametrize("key", ["pixel", "groups"])
def test_leakage_check_sees_same_key_items_across_splits_past_an_excluded_one(key):
    m = meta(3, **{key: ["same"] * 3})
    links = link(m, None)
    bad = pa.table({"id": m.column("id"), "label": m.column("label"), "split": ["train", "excluded", "test"],
                    "unit": ["u"] * 3, "reason": [None, "hand-edited", None]}, schema=io.MANIFEST_SCHEMA)
    assert split.check(bad, m, links) != []


# ================================================================ the stage
def test_run_writes_manifest_with_hash_and_refuses_to_resplit_frozen(paths):
    write_raw(paths, unrelated("cat", 60, 9000))
    r = split.run(SplitConfig(), paths)
    assert Path(paths.split_manifest + ".sha256").read_text().split()[0] == r.manifest_sha256 \
        == io.sha256_file(paths.split_manifest)
    table, recorded = io.read_manifest(paths.split_manifest)
    assert recorded["seed"] == 0 and len(table) == 60 and sum(r.counts.values()) == 60
    assert recorded["cross_split_duplicates"] == "drop_from_train"
    with pytest.raises(split.FrozenSplitError, match=r"split is frozen.*seed: 0 -> 1.*keel split --refreeze"):
        split.run(SplitConfig(seed=1), paths)
    with pytest.raises(split.FrozenSplitError, match=r"cross_split_duplicates: drop_from_train -> fail"):
        split.run(SplitConfig(cross_split_duplicates="fail"), paths)
    assert io.read_manifest(paths.split_manifest)[1]["seed"] == 0
    # detector settings are not split parameters: they may change on a frozen split
    split.run(SplitConfig(near_duplicates=NearDupConfig(min_ncc=0.97)), paths)
    split.run(SplitConfig(seed=1), paths, refreeze=True)
    assert io.read_manifest(paths.split_manifest)[1]["seed"] == 1
    assert splits_of(io.read_manifest(paths.split_manifest)[0]) != splits_of(table)


def test_leakage_report_pairs_and_picture(paths, tmp_path):
    from tests.conftest import tmp_paths

    # a clean source first: its picture says so, with no pair drawn
    clean = tmp_paths(tmp_path / "clean")
    write_raw(clean, unrelated("train", 10, 9100) + unrelated("test", 4, 9150))
    split.run(SplitConfig(), clean)
    assert leakage(clean)["pairs"] == []
    empty = Image.open(clean.leakage_picture)
    empty.verify()

    rows = [raw_row(f"test/cat/t{k}.png", picture(9200 + k)) for k in range(4)]
    rows += [raw_row(f"train/cat/c{k}.png", copy_of(9200 + k, k)) for k in range(4)]
    rows += [raw_row("train/dog/w0.png", picture(9300)), raw_row("train/dog/w1.png", copy_of(9300, 2))]
    rows += unrelated("train", 10, 9400) + unrelated("test", 4, 9450)
    # ingest folded a byte-identical train copy of t0 into the test item
    ids = write_raw(paths, rows, rejects=[{"source_uri": "train/cat/t0-same-bytes.png", "label": "cat",
                                           "reason": "duplicate_bytes", "source_split": "train",
                                           "duplicate_of": rows[0]["id"]}])
    split.run(SplitConfig(), paths)
    report = leakage(paths)
    pairs = report["pairs"]
    for p in pairs:
        assert {"check", "score", "transform", "a", "b", "cross_source_split"} <= set(p)
        for side in ("a", "b"):
            assert set(p[side]) == {"id", "uri", "source_split", "split", "label"}
    cross = [p for p in pairs if p["cross_source_split"]]
    assert pairs[:len(cross)] == cross, "cross-split pairs come first"
    near = {tuple(sorted((p["a"]["uri"], p["b"]["uri"]))): p for p in cross if p["check"] == "near"}
    assert set(near) == {(f"test/cat/t{k}.png", f"train/cat/c{k}.png") for k in range(4)}
    for p in near.values():
        assert p["score"] >= P.min_ncc and p["detail"] >= P.min_detail and p["transform"]
        train_side = p["a"] if p["a"]["source_split"] == "train" else p["b"]
        test_side = p["b"] if train_side is p["a"] else p["a"]
        assert (train_side["split"], test_side["split"]) == ("excluded", "test")
        assert train_side["label"] == test_side["label"] == "cat" and train_side["id"] == ids[train_side["uri"]]
    assert near[("test/cat/t2.png", "train/cat/c2.png")]["transform"].startswith("flip")
    (exact,) = [p for p in cross if p["check"] == "exact_bytes"]
    assert exact["score"] == 1.0 and exact["a"]["uri"] == "test/cat/t0.png" and exact["a"]["split"] == "test"
    assert exact["b"]["uri"] == "train/cat/t0-same-bytes.png" and exact["b"]["source_split"] == "train"
    within = [p for p in pairs if not p["cross_source_split"]]
    assert [(p["check"], p["a"]["uri"], p["b"]["uri"]) for p in within] == \
        [("near", "train/dog/w0.png", "train/dog/w1.png")]
    assert report["links"]["exact_bytes_cross_split"] == 1 and report["links"]["near"] == 5

    img = Image.open(paths.leakage_picture)
    assert img.format == "PNG"
    img.verify()
    img = Image.open(paths.leakage_picture).convert("RGB")
    # 5 cross-split pairs in two columns: three rows of tiles below the title, against one row of nothing
    assert img.width == empty.width and img.height > empty.height
    first_tile = np.asarray(img.crop((0, 28, report_mod.TILE, 28 + report_mod.TILE)))
    assert first_tile.std() > 10, "the first pair's picture is drawn"
    assert Path(paths.leakage_picture).stat().st_size > Path(clean.leakage_picture).stat().st_size


def test_digits_split_has_no_leakage(digits_pipeline):
    p, _, spl, _ = digits_pipeline
    report = json.loads(Path(p.leakage_report).read_text())
    assert report["passed"] and report["problems"] == []
    assert sum(spl.counts.values()) + spl.excluded == 1797
    # digits are 8 x 8: all of them take the pHash check
    assert report["near_duplicate_search"]["small_items"] == 1797
    assert Path(p.leakage_picture).exists()
