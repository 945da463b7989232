"""shard: index, checksums, train-only statistics, the sealed test split, loud failure on corruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks import shard
from tasks.core import io
from tasks.core.config import ShardConfig


def test_index_matches_manifest_and_files(digits_pipeline):
    p, _, spl, sh = digits_pipeline
    index = io.ShardIndex.load(p.shards_dir)
    assert index.classes == [str(i) for i in range(10)]
    assert index.resolution == 32 and index.channels == 3
    assert index.manifest_sha256 == spl.manifest_sha256
    for s in io.SPLITS:
        assert index.rows(s) == spl.counts[s] == sh.rows[s]
        for f in index.splits[s]:
            path = Path(p.shards_dir) / f.file
            assert io.sha256_file(path) == f.sha256 and path.stat().st_size == f.bytes
            md = pq.ParquetFile(path).metadata
            assert md.num_rows == f.rows
            assert all(md.row_group(g).num_rows <= 1024 for g in range(md.num_row_groups))

def test_stats_are_fitted_on_train_only(digits_pipeline):
    p, *_ = digits_pipeline
    index = io.ShardIndex.load(p.shards_dir)
    x, _y, _ids = io.ShardReader(p.shards_dir, "train").read_all()
    assert x.shape == (index.rows("train"), 32, 32, 3) and x.dtype == np.uint8
    mean = (x / 255.0).reshape(-1, 3).mean(0)
    std = (x / 255.0).reshape(-1, 3).std(0)
    assert np.allclose(index.mean, mean, atol=1e-5) and np.allclose(index.std, std, atol=1e-5)
    xv, _, _ = io.ShardReader(p.shards_dir, "val").read_all()
    assert not np.allclose((xv / 255.0).reshape(-1, 3).mean(0), mean, atol=1e-6)  # val differs: stats are train's

def test_shards_hold_exactly_the_manifest_ids(digits_pipeline):
    p, *_ = digits_pipeline
    manifest, _ = io.read_manifest(p.split_manifest)
    want = {s: sorted(i for i, sp in zip(manifest.column("id").to_pylist(), manifest.column("split").to_pylist())
                      if sp == s) for s in ("train", "val")}
    for s in ("train", "val"):
        _, y, ids = io.ShardReader(p.shards_dir, s).read_all()
        assert sorted(ids) == want[s]
        assert y.min() >= 0 and y.max() <= 9

def test_pixels_match_a_direct_decode(digits_pipeline):
    from PIL import Image

    from tasks.core.imaging import normalise, resize_square, to_channels

    p, *_ = digits_pipeline
    x, _, ids = io.ShardReader(p.shards_dir, "val").read_all()
    raw = {r["id"]: r["image"] for r in pq.read_table(p.raw_items, columns=["id", "image"]).to_pylist()}
    import io as _io

    px = normalise(Image.open(_io.BytesIO(raw[ids[0]])))
    assert np.array_equal(x[0], to_channels(resize_square(px, 32), 3))

def test_test_split_is_sealed(digits_pipeline):
    p, *_ = digits_pipeline
    with pytest.raises(io.TestSplitAccessError, match="only the evaluate stage reads it"):
        io.ShardReader(p.shards_dir, "test")
    with pytest.raises(io.TestSplitAccessError):
        io.ShardReader(p.shards_dir, "test", reader_of="tasks.train")
    r = io.ShardReader(p.shards_dir, "test", reader_of="tasks.evaluate")
    assert len(r) == io.ShardIndex.load(p.shards_dir).rows("test")

def test_corrupt_shard_fails_loudly(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    copy = tmp_path / "shards"
    shutil.copytree(p.shards_dir, copy)
    f = copy / io.ShardIndex.load(copy).splits["train"][0].file
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(io.DataError, match=r"train/shard-00000.parquet: checksum mismatch.*re-run `keel shard`"):
        io.ShardReader(copy, "train")
    f.unlink()
    with pytest.raises(io.DataError, match="shard listed in index.json is missing"):
        io.ShardReader(copy, "train")
    (copy / "index.json").write_text("{not json")
    with pytest.raises(io.DataError, match="unreadable shard index"):
        io.ShardReader(copy, "val")

def test_grayscale_and_rectangular_resize(tmp_path):
    from tasks.core.imaging import resize_square, to_channels

    wide = np.zeros((10, 40), np.uint8)
    wide[:, 15:25] = 255  # a bright centre band survives a centre crop
    out = resize_square(wide, 8, "center_crop")
    assert out.shape == (8, 8) and out[:, 3:5].mean() > 200
    assert resize_square(wide, 8, "squash").shape == (8, 8)
    assert to_channels(out, 1).shape == (8, 8, 1) and to_channels(out, 3).shape == (8, 8, 3)

def test_shard_is_atomic_and_refuses_stale_manifest(digits_pipeline, tmp_path):

    p, *_ = digits_pipeline
    # a manifest id that is not in the raw items: the run fails and leaves the old shards untouched
    manifest, meta = io.read_manifest(p.split_manifest)
    import pyarrow as pa

    extra = pa.table({"id": ["f" * 64], "label": ["0"], "split": ["train"], "unit": ["x"], "reason": [None]},
                     schema=io.MANIFEST_SCHEMA)
    bad_manifest = tmp_path / "m.parquet"
    io.write_manifest(bad_manifest, pa.concat_tables([manifest, extra]), meta)
    out = tmp_path / "shards"
    shutil.copytree(p.shards_dir, out)
    before = (out / "index.json").read_text()
    q = p.model_copy(update={"split_manifest": str(bad_manifest), "shards_dir": str(out)})
    with pytest.raises(io.DataError, match="1 manifest id\\(s\\) are not in the raw items"):
        shard.run(ShardConfig(workers=1), q)
    assert (out / "index.json").read_text() == before
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".shards.")]

@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_of_part_of_a_row_group_give_the_same_shards(digits_pipeline, tmp_path, monkeypatch, workers):
    """Tasks of a few rows each (several per raw row group, each worker reading the row groups itself, its cached
    column reused or replaced) write the same shard files as tasks of whole row groups."""
    p, *_ = digits_pipeline
    monkeypatch.setattr(shard, "_TASK_BYTES", 1)
    monkeypatch.setattr(shard, "_MIN_TASK_ROWS", 7)
    q = p.model_copy(update={"shards_dir": str(tmp_path / "small")})
    shard.run(ShardConfig(workers=workers), q)
    assert json.loads((tmp_path / "small" / "index.json").read_text())["splits"] == \
        json.loads((Path(p.shards_dir) / "index.json").read_text())["splits"]  # every file's sha256, rows, bytes


def test_one_channel_shards(digits_pipeline, tmp_path):

    p, *_ = digits_pipeline
    q = p.model_copy(update={"shards_dir": str(tmp_path / "s1")})
    r = shard.run(ShardConfig(resolution=16, channels=1, workers=2), q)
    index = json.loads((tmp_path / "s1" / "index.json").read_text())
    assert index["channels"] == 1 and len(index["mean"]) == 1 and r.rows["train"] > 0
    x, _, _ = io.ShardReader(q.shards_dir, "train").read_all()
    assert x.shape[1:] == (16, 16, 1)


@pytest.mark.parametrize("kind", ["random", "one value", "black and white", "grey"])
def test_mean_std_from_value_counts_is_the_pixel_mean_and_std(kind):
    rng = np.random.default_rng(3)
    x = {"random": rng.integers(0, 256, (300, 8, 8, 3)), "one value": np.full((5, 4, 4, 3), 77),
         "black and white": rng.choice([0, 255], (50, 6, 6, 3)), "grey": rng.integers(0, 256, (40, 8, 8, 1))}[kind]
    x = x.astype(np.uint8)
    counts = shard._channel_counts(x[:100]) + shard._channel_counts(x[100:])  # summed over batches, as run() does
    mean, std = shard._mean_std(counts)
    # what run() summed before: every pixel / 255 in float64
    f = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    ref_mean = f.sum(0) / len(f)
    ref_std = np.sqrt(np.maximum((f * f).sum(0) / len(f) - ref_mean**2, 0.0))
    assert np.allclose(mean, ref_mean, rtol=0, atol=1e-12) and np.allclose(std, ref_std, rtol=0, atol=1e-12)
    assert mean.round(6).tolist() == ref_mean.round(6).tolist() and std.round(6).tolist() == ref_std.round(6).tolist()
