"""The validate stage on tiny in-memory fixtures: a passing set and one negative case per check.

Every negative test asserts on the message a user reads (split, expectation, offending id or class), not only
on the exception type.  Great Expectations is imported once per test process (the first ``run``).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import Paths, ValidateConfig
from tasks.core.io import RAW_SCHEMA, THUMB, DataError, write_manifest
from tasks.validate import ValidateResult, ValidationFailed, run

CLASSES = ["cat", "dog", "frog"]
PER_CLASS = {"train": 10, "val": 4, "test": 4}
HEX_ID = "ab12cd34ef56" + "0" * 52        # a content-addressed id (sha256 hex); messages show its first 12 chars


def _items(per_class: dict[str, dict[str, int]] | None = None) -> list[dict]:
    """Balanced items: per_class[split][label] overrides the default count of that cell."""
    per_class = per_class or {}
    items = []
    for split, n in PER_CLASS.items():
        for label in CLASSES:
            for i in range(per_class.get(split, {}).get(label, n)):
                items.append(_item(f"{split}-{label}-{i}", label, split))
    return items


def _item(id_: str, label: str, split: str, width: int = 32, height: int = 32) -> dict:
    return {"id": id_, "label": label, "split": split, "width": width, "height": height}


def _write(root: Path, items: list[dict], *, excluded: int = 2, not_in_raw: tuple[str, ...] = (),
           raw_schema: pa.Schema = RAW_SCHEMA) -> Paths:
    """Raw items (one part, ids unique as ingest guarantees) and a manifest listing ``items`` as given.

    ``raw_schema`` lets a test write raw items that break the storage contract (a wrong type, a missing column).
    """
    extra = [_item(f"excluded-{i}", "cat", "excluded") for i in range(excluded)]
    raw_rows = list({it["id"]: it for it in items + extra if it["id"] not in not_in_raw}.values())
    n = len(raw_rows)
    raw = pa.table({
        "id": [r["id"] for r in raw_rows], "image": [b"x"] * n, "label": [r["label"] for r in raw_rows],
        "source_uri": [f"{r['id']}.png" for r in raw_rows], "group": [None] * n, "source_split": [None] * n,
        "format": ["PNG"] * n, "width": [r["width"] for r in raw_rows], "height": [r["height"] for r in raw_rows],
        "mode": ["RGB"] * n, "channels": [3] * n, "brightness": [0.5] * n, "contrast": [0.1] * n,
        "pixel_sha": [r["id"] for r in raw_rows], "phash": [0] * n, "thumb": [bytes(THUMB * THUMB)] * n,
    }, schema=RAW_SCHEMA)
    raw = raw.select(raw_schema.names).cast(raw_schema)
    raw_dir = root / "data" / "raw" / "items"
    raw_dir.mkdir(parents=True)
    pq.write_table(raw, raw_dir / "part-00000.parquet")

    rows = items + extra
    manifest = pa.table({
        "id": [r["id"] for r in rows], "label": [r["label"] for r in rows], "split": [r["split"] for r in rows],
        "unit": [r["id"] for r in rows],
        "reason": ["near duplicate" if r["split"] == "excluded" else None for r in rows],
    })
    write_manifest(root / "data" / "split" / "manifest.parquet", manifest, {"seed": 0})
    return Paths(raw_items=str(raw_dir), split_manifest=str(root / "data" / "split" / "manifest.parquet"),
                 validate_dir=str(root / "reports" / "validate"))


def _fail(tmp_path: Path, items: list[dict], **cfg) -> tuple[str, ValidateResult, Paths]:
    paths = _write(tmp_path, items)
    with pytest.raises(ValidationFailed) as info:
        run(ValidateConfig(**cfg), paths)
    # Reports are written before the stage raises, so a failed run can be inspected.
    out = Path(paths.validate_dir)
    assert (out / "docs" / "index.html").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is False and summary["failures"]
    return str(info.value), info.value.result, paths


def _no_nonstandard_json(text: str) -> dict:
    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=reject)


# ---------------------------------------------------------------- passing set
def test_passing_set_writes_reports_and_data_docs(tmp_path, monkeypatch, capsys):
    paths = _write(tmp_path / "project", _items())
    # Nothing may be left in the working folder or in the temp folder (GX's default site builds in /tmp).
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    result = run(ValidateConfig(classes=CLASSES), paths)

    assert result.success and not result.failures
    assert {s: st.rows for s, st in result.splits.items()} == {"train": 30, "val": 12, "test": 12}
    assert result.excluded == 2 and result.not_in_manifest == 0
    assert result.splits["train"].imbalance_ratio == 1.0
    assert result.splits["val"].label_tv_distance == 0.0

    out = Path(paths.validate_dir)
    assert sorted(p.name for p in out.iterdir()) == ["docs", "results.json", "summary.json", "summary.md"]
    assert (out / "docs" / "index.html").is_file()
    assert list((out / "docs" / "validations").iterdir()), "Data Docs hold no validation pages"
    summary = _no_nonstandard_json((out / "summary.json").read_text())
    assert summary["success"] is True
    assert summary["splits"]["test"]["rows"] == 12 and summary["excluded"] == 2
    results = _no_nonstandard_json((out / "results.json").read_text())
    assert results["success"] is True
    assert {b["name"] for b in results["batches"]} == {"train", "val", "test", "all", "label_stats"}
    assert "PASSED" in (out / "summary.md").read_text()

    stdout = capsys.readouterr().out
    for split in ("train", "val", "test"):
        assert f"validate: {split}" in stdout
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["validate"], "atomic write left a temp folder"


def test_declared_classes_default_to_train_labels(tmp_path, capsys):
    result = run(ValidateConfig(), _write(tmp_path, _items()))
    assert result.classes == CLASSES and result.classes_source == "train labels"


def test_import_does_not_import_great_expectations():
    code = "import sys, tasks.validate; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- one negative case per check
def test_label_outside_declared_set(tmp_path):
    items = _items() + [_item(HEX_ID, "horse", "test")]
    msg, result, paths = _fail(tmp_path, items, classes=CLASSES, max_label_distribution_distance=1.0)

    assert msg.startswith("validation failed: 1 expectation(s) on 1 split(s)")
    assert "test: expect_column_values_to_be_in_set(label): 1 unexpected" in msg
    assert "'horse'" in msg and f"ids {HEX_ID[:12]}…" in msg
    assert "validate.classes" in msg                      # says what to do
    assert f"{paths.validate_dir}/summary.md" in msg and "docs/index.html" in msg
    (failure,) = result.failures
    assert failure.sample_ids == [HEX_ID]                 # the full id is kept for the reports
    summary = json.loads((Path(paths.validate_dir) / "summary.json").read_text())
    assert summary["failures"][0]["sample_ids"] == [HEX_ID] and summary["failures"][0]["split"] == "test"
    assert HEX_ID in (Path(paths.validate_dir) / "summary.md").read_text()


def test_class_missing_from_val(tmp_path):
    items = [it for it in _items() if not (it["split"] == "val" and it["label"] == "frog")]
    msg, result, _ = _fail(tmp_path, items, classes=CLASSES, max_label_distribution_distance=1.0)

    assert "val: expect_column_distinct_values_to_contain_set(label): missing frog" in msg
    assert [(f.split, f.expectation) for f in result.failures] == \
        [("val", "expect_column_distinct_values_to_contain_set")]


def test_train_imbalance_over_bound(tmp_path):
    items = _items({"train": {"cat": 30, "dog": 10, "frog": 5}})
    msg, result, _ = _fail(tmp_path, items, max_imbalance_ratio=3.0, max_label_distribution_distance=1.0)

    assert "train: expect_column_values_to_be_between(imbalance_ratio): 6 > max 3" in msg
    assert "largest cat: 30, smallest frog: 5" in msg
    assert "validate.max_imbalance_ratio" in msg
    assert [f.split for f in result.failures] == ["train"]
    assert result.splits["train"].imbalance_ratio == 6.0


def test_width_out_of_bounds(tmp_path):
    items = _items() + [_item("too-wide-1", "dog", "val", width=20_000)]
    msg, result, _ = _fail(tmp_path, items, max_width=4096, max_label_distribution_distance=1.0)

    assert "val: expect_column_values_to_be_between(width): 1 unexpected (values 20000 x1), e.g. ids too-wide-1" \
        in msg
    assert "[8, 4096]" in msg  # validate.min_width defaults to 8 (as params.yaml)
    assert [f.split for f in result.failures] == ["val"]


def test_val_label_distribution_far_from_train(tmp_path):
    items = _items({"val": {"cat": 8, "dog": 1, "frog": 1}})
    msg, result, _ = _fail(tmp_path, items, classes=CLASSES, max_label_distribution_distance=0.1)

    assert "val: expect_column_values_to_be_between(label_tv_distance): 0.467 > max 0.1" in msg
    assert "largest gap cat: 80% in val vs 33% in train" in msg
    assert [f.split for f in result.failures] == ["val"]   # test keeps train's shares


def test_duplicate_id_within_a_split(tmp_path):
    items = _items() + [_item("train-dog-3", "dog", "train")]
    msg, result, _ = _fail(tmp_path, items, max_label_distribution_distance=1.0)

    assert "train: expect_column_values_to_be_unique(id): 2 unexpected, e.g. ids train-dog-3\n" in msg
    assert [f.split for f in result.failures] == ["train"]


def test_duplicate_id_across_splits(tmp_path):
    items = _items() + [_item("train-cat-0", "cat", "test")]
    msg, result, _ = _fail(tmp_path, items, max_label_distribution_distance=1.0)

    assert "all: expect_column_values_to_be_unique(id)" in msg
    assert "train-cat-0 in test, train" in msg
    assert [f.split for f in result.failures] == ["all"]


def test_manifest_id_missing_from_raw_items(tmp_path):
    items = _items()
    paths = _write(tmp_path, items, not_in_raw=("val-dog-2",))
    with pytest.raises(ValidationFailed) as info:
        run(ValidateConfig(), paths)
    msg = str(info.value)
    assert "val: expect_column_values_to_not_be_null(width): 1 unexpected, e.g. ids val-dog-2" in msg
    assert "stale manifest" in msg


def test_raw_column_with_the_wrong_type(tmp_path):
    wide = RAW_SCHEMA.set(RAW_SCHEMA.get_field_index("width"), pa.field("width", pa.int64()))
    paths = _write(tmp_path, _items(), raw_schema=wide)
    with pytest.raises(ValidationFailed) as info:
        run(ValidateConfig(), paths)
    msg = str(info.value)
    assert msg.startswith("validation failed: 3 expectation(s) on 3 split(s)")
    for split in ("train", "val", "test"):
        assert f"{split}: expect_column_values_to_be_of_type(width): observed int64" in msg
    assert "column 'width' has type int32" in msg


def test_raw_part_missing_a_column_is_a_readable_data_error(tmp_path):
    paths = _write(tmp_path, _items(), raw_schema=pa.schema([f for f in RAW_SCHEMA if f.name != "height"]))
    with pytest.raises(DataError, match=r"part-00000.parquet: not a keel raw-items part \(missing columns \[.height.\]\); re-run `keel ingest`"):
        run(ValidateConfig(), paths)
