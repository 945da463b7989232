"""split: stability, duplicates never straddle, source split honoured, policies, the independent leakage check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks import split
from tasks.core import io
from tasks.core.config import SplitConfig


def meta(n, seed=0, groups=None, source_split=None, phash=None, pixel=None, labels=None, start=0):
    rng = np.random.default_rng(seed)
    ids = [f"{start + i:064x}" for i in range(n)]
    return pa.table({
        "id": ids,
        "label": labels or [str(i % 3) for i in range(n)],
        "source_uri": [f"f/{start + i}.png" for i in range(n)],
        "group": groups or [None] * n,
        "source_split": source_split or [None] * n,
        "pixel_sha": pixel or [f"px{start + i}" for i in range(n)],
        "phash": pa.array(phash if phash is not None else rng.integers(0, 2**63, n).astype(np.uint64), pa.uint64()),
    })


def splits_of(table):
    return dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist()))


def test_fractions_are_respected():
    t, _ = split.assign(meta(5000), SplitConfig())
    s = list(splits_of(t).values())
    assert abs(s.count("train") / 5000 - 0.8) < 0.03
    assert abs(s.count("val") / 5000 - 0.1) < 0.02
    assert abs(s.count("test") / 5000 - 0.1) < 0.02


def test_adding_data_never_moves_an_existing_item():
    cfg = SplitConfig()
    a = meta(2000, seed=1)
    b = meta(1000, seed=2, start=2000)
    before = splits_of(split.assign(a, cfg)[0])
    # pure function of (item, seed): even without the frozen manifest nothing moves
    after = splits_of(split.assign(pa.concat_tables([a, b]), cfg)[0])
    assert all(after[i] == s for i, s in before.items())
    # and a different seed does move items (the test can fail)
    other = splits_of(split.assign(a, SplitConfig(seed=7))[0])
    assert sum(other[i] != s for i, s in before.items()) > 100


def test_frozen_units_keep_their_split_when_a_new_item_joins():
    cfg = SplitConfig()
    a = meta(300, seed=3)
    frozen = splits_of(split.assign(a, cfg)[0])
    target = a.column("phash").to_pylist()[17]
    b = meta(1, start=300, phash=[target ^ 1])  # a near duplicate of item 17 arrives later
    t, _ = split.assign(pa.concat_tables([a, b]), cfg, frozen)
    s = splits_of(t)
    assert all(s[i] == v for i, v in frozen.items())
    assert s[f"{300:064x}"] == frozen[f"{17:064x}"]


def test_exact_and_near_duplicates_and_groups_stay_together():
    n = 3000
    rng = np.random.default_rng(5)
    ph = rng.integers(0, 2**63, n).astype(np.uint64)
    pixel = [f"px{i}" for i in range(n)]
    groups = [None] * n
    for i in range(0, 600, 2):  # near duplicates: 3 bits apart
        ph[i + 1] = ph[i] ^ np.uint64(0b10101)
    for i in range(600, 1200, 2):  # exact duplicates (different encodings, same pixels)
        pixel[i + 1] = pixel[i]
    for i in range(1200, 1500):  # caller groups of 10
        groups[i] = f"patient-{i // 10}"
    t, report = split.assign(meta(n, phash=ph, pixel=pixel, groups=groups), SplitConfig())
    s = list(t.column("split").to_pylist())
    assert all(s[i] == s[i + 1] for i in range(0, 1200, 2))
    for g in range(120, 150):
        assert len({s[i] for i in range(g * 10, g * 10 + 10)}) == 1
    assert split.check_leakage(t, meta(n, phash=ph, pixel=pixel, groups=groups), 4) == []
    assert report["near_duplicate_links"] >= 300 and report["exact_duplicate_links"] >= 300


def test_source_test_split_is_honoured_and_val_carved_from_train():
    n = 2000
    src = ["test" if i % 5 == 0 else "train" for i in range(n)]
    t, report = split.assign(meta(n, source_split=src), SplitConfig(val_fraction_of_train=0.2))
    s = list(t.column("split").to_pylist())
    assert all((s[i] == "test") == (src[i] == "test") for i in range(n))
    val_share = s.count("val") / src.count("train")
    assert abs(val_share - 0.2) < 0.04
    assert report["source_split_honoured"]


def _cross(policy):
    n = 200
    ph = np.random.default_rng(9).integers(0, 2**63, n).astype(np.uint64)
    ph[1] = ph[0] ^ np.uint64(3)  # item 1 (train) is a near duplicate of item 0 (test)
    src = ["test"] + ["train"] * (n - 1)
    return meta(n, phash=ph, source_split=src), SplitConfig(cross_split_duplicates=policy)


def test_cross_split_policy_drop_from_train():
    m, cfg = _cross("drop_from_train")
    t, report = split.assign(m, cfg)
    row = t.to_pylist()[1]
    assert row["split"] == "excluded" and "near-duplicate of a source test item" in row["reason"]
    assert report["cross_split_items"][0]["id"] == f"{1:064x}"
    assert report["cross_split_items"][0]["partner_id"] == f"{0:064x}"


def test_cross_split_policy_move_to_test():
    m, cfg = _cross("move_to_test")
    t, _ = split.assign(m, cfg)
    assert t.to_pylist()[1]["split"] == "test"


def _write_raw(p, m):
    d = Path(p.raw_items)
    d.mkdir(parents=True)
    n = len(m)
    full = pa.table({**{c: m.column(c) for c in m.column_names},
                     "image": [b"x"] * n, "format": ["PNG"] * n, "width": pa.array([8] * n, pa.int32()),
                     "height": pa.array([8] * n, pa.int32()), "mode": ["L"] * n, "channels": pa.array([1] * n, pa.int8()),
                     "brightness": pa.array([1.0] * n, pa.float32()), "contrast": pa.array([1.0] * n, pa.float32())})
    import pyarrow.parquet as pq

    pq.write_table(full.select(io.RAW_SCHEMA.names).cast(io.RAW_SCHEMA), d / "part-00000.parquet")


def test_cross_split_policy_fail_lists_the_pair(paths):
    m, cfg = _cross("fail")
    _write_raw(paths, m)
    with pytest.raises(split.LeakageError, match=rf"1 source-train item\(s\) are near duplicates.*\n  {'0' * 16}… "):
        split.run(cfg, paths)
    report = json.loads(Path(paths.leakage_report).read_text())
    assert report["passed"] is False and len(report["cross_split_items"]) == 1
    assert not Path(paths.split_manifest).exists()


def test_leakage_check_catches_a_bad_manifest():
    m = meta(4, pixel=["a", "a", "b", "c"])
    bad = pa.table({"id": m.column("id"), "label": m.column("label"), "split": ["train", "test", "train", "val"],
                    "unit": ["u"] * 4, "reason": [None] * 4}, schema=io.MANIFEST_SCHEMA)
    problems = split.check_leakage(bad, m, 4)
    assert len(problems) == 1 and "exact duplicate (same pixels): f/0.png (train" in problems[0]
    assert "f/1.png (test" in problems[0]
    dup_ids = pa.concat_tables([bad, bad.slice(0, 1)])
    assert any("appears more than once" in p for p in split.check_leakage(dup_ids, m, 4))


def test_run_writes_manifest_with_hash_and_refuses_to_resplit_frozen(paths):
    _write_raw(paths, meta(500))
    r = split.run(SplitConfig(), paths)
    assert Path(paths.split_manifest + ".sha256").read_text().split()[0] == r.manifest_sha256 == io.sha256_file(paths.split_manifest)
    table, recorded = io.read_manifest(paths.split_manifest)
    assert recorded["seed"] == 0 and len(table) == 500
    with pytest.raises(split.FrozenSplitError, match=r"split is frozen.*seed: 0 -> 1.*keel split --refreeze"):
        split.run(SplitConfig(seed=1), paths)
    split.run(SplitConfig(seed=1), paths, refreeze=True)
    assert io.read_manifest(paths.split_manifest)[1]["seed"] == 1


def test_digits_split_has_no_leakage(digits_pipeline):
    p, _, spl, _ = digits_pipeline
    report = json.loads(Path(p.leakage_report).read_text())
    assert report["passed"] and report["problems"] == []
    assert sum(spl.counts.values()) + spl.excluded == 1797
