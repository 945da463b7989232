"""shard: decode, normalise and resize each split into streaming-friendly parquet shards plus an index.

Reads the raw items once (streaming): this process reads their ids and hands each worker a row group's rows to
decode; the worker reads those rows' original bytes itself (the images travel neither through this process nor
through a pipe).  Keeps the manifest's train/val/test rows (``excluded`` rows are not sharded), and writes
``<split>/shard-NNNNN.parquet`` with uint8 HWC images at the training resolution.  The normalisation mean/std
are fitted on train only.  The whole shard directory is built under a temporary name and swapped into place, so
a killed run never leaves a directory that looks finished.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.core import io, progress
from tasks.core.config import Paths, ShardConfig
from tasks.core.imaging import (
    draft_scale,
    fast_pixels,
    jpeg_pixels,
    plain_jpeg,
    preprocess,
    resize_square,
    scaled_draft,
    to_channels,
)
from tasks.core.parallel import ExecutorSpec, bounded_map

_W: dict = {}
_TASK_BYTES = 32 << 20  # decoded bytes a task aims at (its result crosses a pipe or the network)
_MIN_TASK_ROWS = 256


def _init(cfg: dict) -> None:
    _W.clear()
    _W.update(cfg)


def _blobs(part: str, row_group: int, rows: list[int]) -> list[bytes]:
    """The original bytes of rows ``rows`` of one row group of a raw part, read here in the worker (the stage's
    process reads only the ids: the images are not read twice nor sent to the workers). The row group last read
    is kept: consecutive batches of one row group read it once. Kept as one (key, column) tuple, read into a
    local: a Dask worker may run several tasks at once on threads, and none may take another's column."""
    cached = _W.get("group")
    if cached is None or cached[0] != (part, row_group):
        opened = _W.get("part")
        if opened is None or opened[0] != part:  # its footer parsed once per part, not once per row group
            opened = part, pq.ParquetFile(part)
            _W["part"] = opened
        cached = (part, row_group), opened[1].read_row_group(row_group, columns=["image"]).column("image")
        _W["group"] = cached
    return cached[1].take(pa.array(rows, pa.int64())).to_pylist()


def _decode_batch(batch: tuple[str, int, list[int], list[str]]) -> tuple[list[str], np.ndarray]:
    """One task of the map: (part, row group, rows, their ids) -> (ids, decoded images)."""
    part, row_group, rows, ids = batch
    return ids, _decode(_blobs(part, row_group, rows))


def _decode(blobs: list[bytes]) -> np.ndarray:
    """uint8 [N, resolution, resolution, channels]: each original decoded as the worker's config says."""
    import io as _io

    out = np.empty((len(blobs), _W["resolution"], _W["resolution"], _W["channels"]), np.uint8)
    with warnings.catch_warnings():  # ingest already applied the bomb guard to these exact bytes (imaging.open_image)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # locally: the host's Pillow limit stays
        for k, data in enumerate(blobs):
            header = plain_jpeg(data)  # a plain JPEG: its size from the header in C, no Pillow open (imaging)
            if header is not None:
                w, h, mode = header
                s = draft_scale(w, h, _W["resolution"]) if _W["decode"] == "scaled" else 1
                px = jpeg_pixels(data, mode, (w // s, h // s))  # what scaled_draft + fast_pixels give, byte for byte
                if px is not None:
                    out[k] = to_channels(resize_square(px, _W["resolution"], _W["resize"]), _W["channels"])
                    continue
            img = Image.open(_io.BytesIO(data))
            if _W["decode"] == "scaled":
                scaled_draft(img, _W["resolution"])  # a large JPEG decodes at 1/2-1/8 scale; serving does the same
            px = fast_pixels(img, data)  # a plain JPEG: simplejpeg, Pillow's pixels byte for byte, ~7x faster
            if px is None:
                img.load()
                out[k] = preprocess(img, _W["resolution"], _W["channels"], _W["resize"], _W["background"])
            else:  # preprocess() after its normalise step, which leaves such pixels as they are
                out[k] = to_channels(resize_square(px, _W["resolution"], _W["resize"]), _W["channels"])
    return out


def _channel_counts(images: np.ndarray) -> np.ndarray:
    """int64 [C, 256]: how many pixels of each channel of uint8 images [..., C] take each value.

    The train statistics need nothing more (256 counts per channel, not a float copy of every pixel)."""
    x = images.reshape(-1, images.shape[-1])
    return np.stack([np.bincount(x[:, c], minlength=256) for c in range(x.shape[1])])


def _mean_std(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of the pixel values / 255 from ``_channel_counts``."""
    v = np.arange(256) / 255.0
    n = counts.sum(axis=1)
    mean = counts @ v / n
    return mean, np.sqrt(np.maximum(counts @ (v * v) / n - mean**2, 0.0))


def image_type(cfg: ShardConfig) -> pa.DataType:
    return pa.binary(cfg.resolution * cfg.resolution * cfg.channels)


def shard_schema(cfg: ShardConfig) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("label", pa.int16()), ("image", image_type(cfg))])


@dataclass
class ShardResult:
    rows: dict[str, int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    seconds: float


class _SplitWriter:
    def __init__(self, root: Path, split: str, cfg: ShardConfig):
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.cfg, self.schema = split, cfg, shard_schema(cfg)
        self.files: list[io.ShardFile] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0
        self.buf: list[pa.RecordBatch] = []
        self.buf_rows = 0

    def add(self, ids: list[str], labels: np.ndarray, images: np.ndarray) -> None:
        flat = pa.FixedSizeBinaryArray.from_buffers(image_type(self.cfg), len(ids),
                                                    [None, pa.py_buffer(np.ascontiguousarray(images).tobytes())])
        self.buf.append(pa.record_batch([pa.array(ids, pa.string()), pa.array(labels, pa.int16()), flat],
                                        schema=self.schema))
        self.buf_rows += len(ids)
        while self.buf_rows >= self.cfg.row_group_rows:
            self._write(self.cfg.row_group_rows)

    def _write(self, n: int) -> None:
        table = pa.Table.from_batches(self.buf, schema=self.schema)
        # one chunk per row group: the file's pages then depend on its rows only, not on how the tasks that
        # decoded them were cut (worker count, executor, task size), so the checksums do not either
        head, rest = table.slice(0, n).combine_chunks(), table.slice(n)
        if self.writer is None:
            name = f"{self.split}/shard-{len(self.files):05d}.parquet"
            self.writer = pq.ParquetWriter(self.dir.parent / name, self.schema, compression="zstd")
            self.current = name
        self.writer.write_table(head, row_group_size=self.cfg.row_group_rows)
        self.rows_in_file += len(head)
        self.buf = rest.to_batches()
        self.buf_rows = len(rest)
        if self.rows_in_file >= self.cfg.shard_rows:
            self._close_file()

    def _close_file(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        path = self.dir.parent / self.current
        self.files.append(io.ShardFile(self.current, self.rows_in_file, path.stat().st_size, io.sha256_file(path)))
        self.writer, self.rows_in_file = None, 0

    def close(self) -> list[io.ShardFile]:
        if self.buf_rows:
            self._write(self.buf_rows)
        self._close_file()
        return self.files


def run(cfg: ShardConfig, paths: Paths) -> ShardResult:
    t0 = time.monotonic()
    manifest, _ = io.read_manifest(paths.split_manifest)
    manifest_sha = io.sha256_file(paths.split_manifest)
    split_of = {i: s for i, s in zip(manifest.column("id").to_pylist(), manifest.column("split").to_pylist())
                if s in io.SPLITS}
    classes = sorted({lab for lab, s in zip(manifest.column("label").to_pylist(), manifest.column("split").to_pylist())
                      if s in io.SPLITS})
    class_index = {c: k for k, c in enumerate(classes)}
    label_of = dict(zip(manifest.column("id").to_pylist(), manifest.column("label").to_pylist()))
    total = len(split_of)

    # rows per task: a whole row group when its decoded images are small (one read of it, by one worker), else
    # fewer, so that a task's result stays near 32 MB (at 224 px, 256 rows: 38 MB)
    per_task = max(_MIN_TASK_ROWS, _TASK_BYTES // (cfg.resolution * cfg.resolution * cfg.channels))

    def batches():
        # (part, row group, rows, ids) of at most per_task manifest rows each; the workers read the bytes
        # themselves, from an absolute path (a Dask worker's working directory is not the stage's)
        for part in io.raw_parts(paths.raw_items):
            pf = pq.ParquetFile(part)
            for g in range(pf.num_row_groups):
                ids = pf.read_row_group(g, columns=["id"]).column("id").to_pylist()
                keep = [k for k, i in enumerate(ids) if i in split_of]
                for s in range(0, len(keep), per_task):
                    rows = keep[s:s + per_task]
                    yield os.path.abspath(part), g, rows, [ids[k] for k in rows]

    counts = np.zeros((cfg.channels, 256), np.int64)
    worker_cfg = {"resolution": cfg.resolution, "channels": cfg.channels, "resize": cfg.resize,
                  "background": list(cfg.alpha_background), "decode": cfg.decode}
    with io.atomic_dir(paths.shards_dir) as tmp, progress.progress(total=total, desc="shard", unit="item") as bar:
        writers = {s: _SplitWriter(tmp, s, cfg) for s in io.SPLITS}
        seen_in_raw = 0
        for ids, images in bounded_map(_decode_batch, batches(), cfg.workers, initializer=_init,
                                       initargs=(worker_cfg,), executor=ExecutorSpec.of(cfg, "shard")):
            seen_in_raw += len(ids)
            splits = np.array([split_of[i] for i in ids], dtype=object)
            labels = np.array([class_index[label_of[i]] for i in ids], np.int16)
            for s in io.SPLITS:
                m = splits == s
                if m.any():
                    sel = np.nonzero(m)[0]
                    writers[s].add([ids[k] for k in sel], labels[sel], images[sel])
                    if s == "train":
                        counts += _channel_counts(images[sel])
            bar.update(len(ids))
        if seen_in_raw != total:
            raise io.DataError(f"{paths.split_manifest}: {total - seen_in_raw} manifest id(s) are not in the raw items "
                               f"at {paths.raw_items}; the manifest and raw items are out of step: re-run split")
        files = {s: w.close() for s, w in writers.items()}
        if not counts.any():
            raise io.DataError("shard: the train split is empty; nothing to fit normalisation statistics on")
        mean, std = _mean_std(counts)
        index = io.ShardIndex(classes=classes, resolution=cfg.resolution, channels=cfg.channels, mean=mean.round(6).tolist(),
                              std=std.round(6).tolist(), manifest_sha256=manifest_sha, splits=files,
                              resize=cfg.resize, background=list(cfg.alpha_background), decode=cfg.decode)
        io.write_json(tmp / "index.json", index.to_json())
    rows = {s: sum(f.rows for f in v) for s, v in files.items()}
    print(f"shard: {rows} at {cfg.resolution}x{cfg.resolution}x{cfg.channels}; train mean {index.mean} std {index.std}")
    progress.summary("shard", sum(rows.values()), None, time.monotonic() - t0)
    return ShardResult(rows, classes, index.mean, index.std, time.monotonic() - t0)
