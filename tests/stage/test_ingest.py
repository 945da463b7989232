"""ingest on tiny real files: every bad input the issue names, and the found = ingested + rejected account."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import ingest
from tasks.core.config import IngestConfig
from tasks.core.io import read_raw_meta
from tasks.ingest.sources import SourceError
from tests.conftest import encode, pattern


def _tables(paths):
    meta = read_raw_meta(paths.raw_items).to_pylist()
    rejects = pq.read_table(paths.rejects).to_pylist()
    return {r["source_uri"]: r for r in meta}, {r["source_uri"]: r for r in rejects}


@pytest.fixture
def awkward_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True), dog.mkdir()
    (cat / "good.jpg").write_bytes(encode(pattern(1), "JPEG", quality=90))
    (cat / "good.png").write_bytes(encode(pattern(2)))
    (cat / "empty.jpg").write_bytes(b"")
    jpg = encode(pattern(3, 64), "JPEG", quality=90)
    (cat / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = encode(pattern(4, 64))
    (cat / "truncated.png").write_bytes(png[: len(png) // 2])
    (cat / "notes.jpg").write_bytes(b"this is a text file, not a JPEG\n")
    cmyk = Image.fromarray(pattern(5)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    (dog / "cmyk.jpg").write_bytes(buf.getvalue())
    sixteen = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250)
    Image.fromarray(sixteen).save(dog / "sixteen.png")
    rgba = np.dstack([pattern(6), np.full((16, 16), 128, np.uint8)])
    Image.fromarray(rgba).save(dog / "rgba.png")
    Image.fromarray(pattern(7)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(dog / "palette.png")
    (dog / "ünïcødé 猫.png").write_bytes(encode(pattern(8)))
    Image.fromarray(pattern(9, 128)).save(dog / "big.png")  # 16384 px: a bomb under max_pixels=10000
    Image.fromarray(np.ones((16, 16), np.float32)).save(dog / "float.tiff")
    (dog / "copy.png").write_bytes((cat / "good.png").read_bytes())  # byte-identical, other label
    (root / "loose.png").write_bytes(encode(pattern(10)))  # no class folder
    outside = tmp_path / "outside.png"
    outside.write_bytes(encode(pattern(11)))
    os.symlink(outside, cat / "escape.png")
    return root


def test_awkward_inputs_are_normalised_or_rejected_by_rule(awkward_folder, paths):
    result = ingest.run(IngestConfig(source=str(awkward_folder), max_pixels=10_000, workers=1), paths)
    items, rejects = _tables(paths)
    assert result.found == result.ingested + result.rejected == 16
    assert len(items) + len(rejects) == result.found
    expected_rejects = {
        "cat/empty.jpg": "empty_file",
        "cat/truncated.jpg": "corrupt_image",
        "cat/truncated.png": "corrupt_image",
        "cat/notes.jpg": "not_an_image",
        "dog/big.png": "decompression_bomb",
        "dog/float.tiff": "unsupported_mode",
        "loose.png": "missing_label",
        "cat/escape.png": "path_escapes_root",
    }
    for uri, reason in expected_rejects.items():
        assert rejects[uri]["reason"] == reason, (uri, rejects[uri])
    assert "16384 pixels" in rejects["dog/big.png"]["detail"]
    assert "ingest.max_pixels=10000" in rejects["dog/big.png"]["detail"]
    assert "outside" in rejects["cat/escape.png"]["detail"]
    # good.png and copy.png are the same bytes under two labels: neither is kept, both say why
    for uri in ("cat/good.png", "dog/copy.png"):
        assert rejects[uri]["reason"] == "conflicting_labels"
        assert "cat/good.png (label 'cat'), dog/copy.png (label 'dog')" in rejects[uri]["detail"] or \
            "dog/copy.png (label 'dog'), cat/good.png (label 'cat')" in rejects[uri]["detail"]
    # normalisation rule: CMYK/palette/RGBA -> 3 channels, 16-bit -> 1 channel; modes recorded as stored
    assert items["dog/cmyk.jpg"]["mode"] == "CMYK" and items["dog/cmyk.jpg"]["channels"] == 3
    assert items["dog/sixteen.png"]["mode"].startswith("I") and items["dog/sixteen.png"]["channels"] == 1
    assert items["dog/rgba.png"]["channels"] == 3
    assert items["dog/palette.png"]["mode"] == "P"
    assert items["dog/ünïcødé 猫.png"]["label"] == "dog"
    assert items["cat/good.jpg"]["width"] == 16 and items["cat/good.jpg"]["label"] == "cat"


def test_ids_are_content_hashes_and_features_present(awkward_folder, paths):
    import hashlib

    ingest.run(IngestConfig(source=str(awkward_folder), workers=1), paths)
    t = pq.read_table(paths.raw_items).to_pylist()
    for row in t:
        assert row["id"] == hashlib.sha256(row["image"]).hexdigest()
        assert 0 <= row["brightness"] <= 255 and row["contrast"] >= 0
        assert row["phash"] is not None and len(row["pixel_sha"]) == 64


def test_sixteen_bit_scales_full_range(tmp_path, paths):
    root = tmp_path / "d" / "a"
    root.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(root / "white.png")
    (root.parent / "b").mkdir()
    (root.parent / "b" / "other.png").write_bytes(encode(pattern(1)))  # a second class: ingest needs two
    ingest.run(IngestConfig(source=str(root.parent), workers=1), paths)
    items, _ = _tables(paths)
    assert items["a/white.png"]["brightness"] == pytest.approx(255)


def test_alpha_reject_rule(awkward_folder, paths):
    ingest.run(IngestConfig(source=str(awkward_folder), alpha="reject", workers=1), paths)
    _, rejects = _tables(paths)
    assert rejects["dog/rgba.png"]["reason"] == "alpha_not_allowed"


def test_unknown_label_rejected_when_classes_declared(awkward_folder, paths):
    (awkward_folder / "bird").mkdir()
    (awkward_folder / "bird" / "b.png").write_bytes(encode(pattern(30)))
    r = ingest.run(IngestConfig(source=str(awkward_folder), classes=["cat", "bird"], workers=1), paths)
    items, rejects = _tables(paths)
    assert rejects["dog/cmyk.jpg"]["reason"] == "unknown_label"
    assert "'dog' not in ingest.classes ['bird', 'cat']" in rejects["dog/cmyk.jpg"]["detail"]
    assert {i["label"] for i in items.values()} == {"cat", "bird"}
    assert r.found == r.ingested + r.rejected


def test_workers_2_gives_the_same_table(awkward_folder, tmp_path):
    from tests.conftest import tmp_paths

    p1, p2 = tmp_paths(tmp_path / "one"), tmp_paths(tmp_path / "two")
    ingest.run(IngestConfig(source=str(awkward_folder), workers=1), p1)
    ingest.run(IngestConfig(source=str(awkward_folder), workers=2), p2)
    assert pq.read_table(p1.raw_items).equals(pq.read_table(p2.raw_items))
    assert pq.read_table(p1.rejects).equals(pq.read_table(p2.rejects))


def _manifest_source(tmp_path: Path, rows: str) -> Path:
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(encode(pattern(20)))
    (root / "imgs" / "b.png").write_bytes(encode(pattern(21)))
    (tmp_path / "secret.png").write_bytes(encode(pattern(22)))
    os.symlink(tmp_path / "secret.png", root / "imgs" / "link.png")
    m = root / "manifest.csv"
    m.write_text(rows)
    return m


def test_manifest_rows_escaping_the_root_are_rejected(tmp_path, paths):
    m = _manifest_source(tmp_path, "path,label,group,split\n"
                                   "imgs/a.png,x,g1,train\n"
                                   "imgs/b.png,y,,test\n"
                                   "../secret.png,x,,\n"
                                   f"{tmp_path / 'secret.png'},x,,\n"
                                   "imgs/link.png,x,,\n"
                                   "imgs/missing.png,x,,\n"
                                   "imgs/b.png,,,\n"
                                   "imgs/a.png,x,,holdout\n")
    r = ingest.run(IngestConfig(source=str(m), workers=1), paths)
    items, rejects = _tables(paths)
    assert r.found == 8 and r.ingested == 2 and r.rejected == 6
    assert items["imgs/a.png"]["group"] == "g1" and items["imgs/a.png"]["source_split"] == "train"
    assert items["imgs/b.png"]["source_split"] == "test"
    assert rejects["../secret.png"]["reason"] == "path_escapes_root"
    assert "manifest.csv row 4" in rejects["../secret.png"]["detail"]
    assert rejects[str(tmp_path / "secret.png")]["reason"] == "path_escapes_root"
    assert "absolute path" in rejects[str(tmp_path / "secret.png")]["detail"]
    assert rejects["imgs/link.png"]["reason"] == "path_escapes_root"
    assert "symlink" in rejects["imgs/link.png"]["detail"]
    assert rejects["imgs/missing.png"]["reason"] == "missing_file"
    reasons = sorted(r["reason"] for r in pq.read_table(paths.rejects).to_pylist())
    assert reasons.count("missing_label") == 1 and reasons.count("unknown_split") == 1


def test_parquet_manifest(tmp_path, paths):
    import pyarrow as pa

    m = _manifest_source(tmp_path, "")
    pq.write_table(pa.table({"path": ["imgs/a.png", "imgs/b.png"], "label": [1, 2]}), m.with_suffix(".parquet"))
    r = ingest.run(IngestConfig(source=str(m.with_suffix(".parquet")), workers=1), paths)
    items, _ = _tables(paths)
    assert r.ingested == 2 and items["imgs/a.png"]["label"] == "1"


def test_manifest_without_required_columns(tmp_path, paths):
    m = _manifest_source(tmp_path, "file,class\nimgs/a.png,x\n")
    with pytest.raises(SourceError, match=r"manifest.csv: manifest needs columns \(path or uri, label.*found \['class', 'file'\]"):
        ingest.run(IngestConfig(source=str(m), workers=1), paths)


def test_missing_source(tmp_path, paths):
    with pytest.raises(SourceError, match="does not exist"):
        ingest.run(IngestConfig(source=str(tmp_path / "nope")), paths)
    with pytest.raises(SourceError, match="unknown builtin"):
        ingest.run(IngestConfig(source="builtin:mnist"), paths)


def test_split_level_folder(tmp_path, paths):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            d = tmp_path / "src" / split / c
            d.mkdir(parents=True)
            for k in range(n):
                # a distinct pattern per file: hash() of strings changes per process (PYTHONHASHSEED), and two of
                # its values mod 10,000 colliding made byte-identical files, a duplicate_bytes reject, now and then
                seed = ("train", "test").index(split) * 100 + ("a", "b").index(c) * 10 + k
                (d / f"{k}.png").write_bytes(encode(pattern(seed)))
    ingest.run(IngestConfig(source=str(tmp_path / "src"), workers=1), paths)
    items, _ = _tables(paths)
    assert items["test/a/0.png"]["source_split"] == "test" and items["test/a/0.png"]["label"] == "a"
    assert sum(1 for i in items.values() if i["source_split"] == "train") == 6


def test_digits_audit(digits_pipeline):
    import json

    p, ing, _, _ = digits_pipeline
    assert ing.found == ing.ingested == 1797 and ing.rejected == 0
    audit = json.loads(Path(p.audit_dir, "audit.json").read_text())
    assert audit["class_counts"]["0"] == 178 and len(audit["classes"]) == 10
    assert 1.0 <= audit["imbalance_ratio"] < 1.1
    assert len(audit["contact_sheet"]["ids"]) == 100
    for f in ("audit.md", "class_counts.png", "resolution.png", "brightness.png", "contact_sheet.png"):
        assert Path(p.audit_dir, f).stat().st_size > 0
    # the contact sheet sample is seeded: the same seed picks the same items
    from tasks.core.io import read_raw_meta
    from tasks.ingest.audit import _contact_sheet

    meta = read_raw_meta(p.raw_items)
    ids = meta.column("id").to_pylist()
    labels = np.asarray(meta.column("label").to_pylist(), dtype=object)
    again = _contact_sheet(Path(p.audit_dir) / "again.png", p.raw_items, ids, labels, 100, 0)
    assert again == audit["contact_sheet"]["ids"]


def test_parts_are_bounded_and_read_back_whole(awkward_folder, paths):
    r = ingest.run(IngestConfig(source=str(awkward_folder), part_rows=3, workers=1), paths)
    parts = sorted(Path(paths.raw_items).glob("part-*.parquet"))
    assert len(parts) == -(-r.ingested // 3) and all(pq.read_metadata(p).num_rows <= 3 for p in parts)
    assert len(read_raw_meta(paths.raw_items)) == r.ingested


def test_real_decompression_bomb_header_is_rejected(tmp_path, paths):
    # a PNG whose header claims 30000 x 30000 pixels (900 M): rejected from the header, nothing decoded
    d = tmp_path / "bomb" / "a"
    d.mkdir(parents=True)
    Image.new("1", (30000, 30000)).save(d / "bomb.png", optimize=True)
    (d / "ok.png").write_bytes(encode(pattern(3)))
    (d.parent / "b").mkdir()
    (d.parent / "b" / "ok.png").write_bytes(encode(pattern(4)))
    r = ingest.run(IngestConfig(source=str(tmp_path / "bomb"), workers=1), paths)
    _, rejects = _tables(paths)
    assert r.ingested == 2 and rejects["a/bomb.png"]["reason"] == "decompression_bomb"


def test_nothing_readable_fails_but_keeps_the_reasons(tmp_path, paths):
    from tasks.core.io import DataError

    d = tmp_path / "bad" / "a"
    d.mkdir(parents=True)
    (d / "x.jpg").write_bytes(b"")
    (d / "y.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"none of the 2 items from .*bad could be ingested; see the reasons in"):
        ingest.run(IngestConfig(source=str(tmp_path / "bad"), workers=1), paths)
    reasons = sorted(r["reason"] for r in pq.read_table(paths.rejects).to_pylist())
    assert reasons == ["empty_file", "not_an_image"]
    assert not Path(paths.raw_items).exists()  # nothing that looks like a finished raw table


# ---------------------------------------------------------------- byte-identical copies across source splits
def _uri_key(uri: str) -> bytes:
    return hashlib.sha1(uri.encode()).digest()  # ingest's processing order (tasks.ingest.run)


def _names(train_first: bool, same_name: bool) -> tuple[str, str]:
    """File names for the train and the test copy such that ingest meets the train copy first (or last)."""
    for k in range(1000):
        train = f"copy{k}.png"
        test = train if same_name else f"other{k}.png"
        if (_uri_key(f"train/cat/{train}") < _uri_key(f"test/cat/{test}")) == train_first:
            return train, test
    raise AssertionError("no names found")


@pytest.mark.parametrize("layout", [(2, None), (100, 1)], ids=["parts of two rows", "one part of one-row groups"])
@pytest.mark.parametrize("same_name", [True, False], ids=["same name", "other name"])
@pytest.mark.parametrize("train_first", [True, False], ids=["train copy met first", "train copy met last"])
def test_cross_split_byte_identical_copy_keeps_the_test_copy(tmp_path, paths, train_first, same_name, layout,
                                                            monkeypatch):
    from tasks import split
    from tasks.core.config import SplitConfig
    from tasks.core.io import read_raw_thumbs

    train_name, test_name = _names(train_first, same_name)
    root = tmp_path / "src"
    for sub in ("train/cat", "train/dog", "test/cat", "test/dog"):
        (root / sub).mkdir(parents=True)
    data = encode(pattern(500, 32))
    (root / "train" / "cat" / train_name).write_bytes(data)
    (root / "test" / "cat" / test_name).write_bytes(data)
    for k in range(6):
        (root / "train" / ("cat", "dog")[k % 2] / f"t{k}.png").write_bytes(encode(pattern(510 + k, 32)))
    for k in range(3):
        (root / "test" / ("cat", "dog")[k % 2] / f"s{k}.png").write_bytes(encode(pattern(520 + k, 32)))
    train_uri, test_uri = f"train/cat/{train_name}", f"test/cat/{test_name}"
    order = sorted([train_uri, test_uri], key=_uri_key)
    assert order[0] == (train_uri if train_first else test_uri)

    # two rows per part: a copy met late replaces a row already written to an earlier part; or one part whose
    # row groups are written as they fill: the row replaced is in a written row group of the part still open
    part_rows, row_group = layout
    if row_group is not None:
        monkeypatch.setattr(ingest.io, "RAW_ROW_GROUP", row_group)
    r = ingest.run(IngestConfig(source=str(root), workers=1, part_rows=part_rows), paths)
    assert len(list(Path(paths.raw_items).glob("part-*.parquet"))) == (5 if part_rows == 2 else 1)
    part = pq.ParquetFile(min(Path(paths.raw_items).glob("part-*.parquet")))
    if row_group is not None:
        assert part.num_row_groups == 10
    columns = part.metadata.row_group(0)
    compression = {columns.column(k).path_in_schema: columns.column(k).compression for k in range(columns.num_columns)}
    assert compression["image"] == "UNCOMPRESSED" and compression["thumb"] == "SNAPPY"  # encoded bytes do not shrink
    assert r.found == 11 and r.ingested == 10 and r.reject_counts == {"duplicate_bytes": 1}
    items, rejects = _tables(paths)
    assert train_uri not in items and set(rejects) == {train_uri}
    kept = items[test_uri]
    assert kept["id"] == hashlib.sha256(data).hexdigest() and kept["source_split"] == "test"
    assert kept["label"] == "cat"
    rej = rejects[train_uri]
    assert (rej["reason"], rej["source_split"], rej["duplicate_of"], rej["label"]) == \
        ("duplicate_bytes", "train", kept["id"], "cat")
    assert f"from {test_uri} (test copy kept, this train copy dropped)" in rej["detail"]
    raw = pq.read_table(paths.raw_items).to_pylist()
    assert [row["image"] for row in raw if row["id"] == kept["id"]] == [data]
    assert len(read_raw_thumbs(paths.raw_items)) == len(raw) == 10

    # split: the folded copy is a cross-split pair of the report; under `fail` it stops the stage
    split.run(SplitConfig(), paths)
    report = json.loads(Path(paths.leakage_report).read_text())
    (pair,) = [p for p in report["pairs"] if p["check"] == "exact_bytes"]
    assert pair["cross_source_split"] and pair["score"] == 1.0
    assert (pair["a"]["uri"], pair["a"]["source_split"], pair["a"]["split"]) == (test_uri, "test", "test")
    assert (pair["b"]["uri"], pair["b"]["source_split"]) == (train_uri, "train")
    assert pair["a"]["id"] == pair["b"]["id"] == kept["id"]
    assert report["links"]["exact_bytes_cross_split"] == 1
    Path(paths.split_manifest).unlink()
    with pytest.raises(split.LeakageError) as info:
        split.run(SplitConfig(cross_split_duplicates="fail"), paths)
    assert f"  {train_uri} (train) ~ {test_uri}\n" in str(info.value)
    assert not Path(paths.split_manifest).exists()
