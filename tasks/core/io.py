"""Storage contracts of keel's data half and the only code that reads or writes them.

Every later stage plugs into these.  Paths come from ``params.yaml:paths`` (declared once).

Raw items  (``paths.raw_items``: a directory of ``part-NNNNN.parquet``; written by ``ingest``)
    id            string   sha256 hex of the original encoded bytes (content-addressed, unique)
    image         binary   the original encoded bytes, untouched
    label         string   class name as given by the source
    source_uri    string   where the bytes came from (file path relative to the source root, s3:// URI, builtin:...)
    group         string?  caller-provided group (manifest ``group`` column); items of a group never straddle splits
    source_split  string?  split given by the source (``train``/``val``/``test`` folder level or manifest column)
    format        string   PIL format name (JPEG, PNG, ...)
    width, height int32    decoded size in pixels
    mode          string   PIL mode as stored (L, RGB, RGBA, P, CMYK, I;16, ...)
    channels      int8     channels after keel's normalisation rule (1 for L/I;16, else 3)
    brightness    float32  mean of the normalised 8-bit grayscale image, 0..255 (of its feature copy:
                           ``imaging.feature_pixels``, box-reduced when the shorter side is >= 128 px;
                           contrast, phash and thumb read the same copy)
    contrast      float32  standard deviation of the same, 0..255
    pixel_sha     string   sha256 of the normalised decoded pixels (exact duplicates across encodings)
    phash         uint64   64-bit DCT perceptual hash (the audit's duplicate counts)
    thumb         binary   32x32 grey thumbnail, 1,024 bytes (``tasks.core.neardup``: split's near-duplicate search)

Rejects  (``paths.rejects``: one parquet file; written by ``ingest``)
    source_uri string, label string?, reason string (a stable code, see ``tasks.ingest.REASONS``), detail string,
    source_split string?, duplicate_of string? (``duplicate_bytes``: the id of the kept byte-identical item)
    found = ingested + rejected, always.

Split manifest  (``paths.split_manifest``: one parquet file, its sha256 in ``<manifest>.sha256``; written by ``split``)
    id string, label string, split string (train | val | test | excluded), unit string (the leakage unit: items
    sharing it were kept together), reason string? (why an item is excluded or was moved)
    Key-value metadata ``keel.split``: JSON of the split config that produced it (seed, fractions, ...).

Shards  (``paths.shards_dir``; written by ``shard``)
    ``<split>/shard-NNNNN.parquet`` with columns id string, label int16 (index into ``classes``),
    image fixed_size_binary(resolution*resolution*channels) (uint8, HWC, row-major); row groups of ``shard.row_group_rows``.
    ``index.json``: see ``ShardIndex``; per shard ``file``, ``rows``, ``bytes``, ``sha256``; ``classes``;
    ``mean``/``std`` per channel on the 0..1 scale, fitted on train only; ``resolution``, ``channels``,
    ``manifest_sha256``.  Read shards only through ``ShardReader``: it verifies checksums and refuses the test
    split unless the caller is the evaluate stage.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.errors import DataError

SPLITS = ("train", "val", "test")
THUMB = 32  # side of the raw ``thumb`` column's images; the same value as tasks.core.neardup.THUMB (tested)

RAW_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.binary()),
    ("label", pa.string()),
    ("source_uri", pa.string()),
    ("group", pa.string()),
    ("source_split", pa.string()),
    ("format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("mode", pa.string()),
    ("channels", pa.int8()),
    ("brightness", pa.float32()),
    ("contrast", pa.float32()),
    ("pixel_sha", pa.string()),
    ("phash", pa.uint64()),
    ("thumb", pa.binary()),
])
RAW_META_COLUMNS = [f.name for f in RAW_SCHEMA if f.name not in ("image", "thumb")]
# The original bytes are stored uncompressed: encoded images do not compress (snappy saved 0.2 % on the
# 384 px JPEG set), and decompressing them cost shard's read 4x its time. The other columns: snappy.
RAW_COMPRESSION = {f.name: "none" if f.name == "image" else "snappy" for f in RAW_SCHEMA}
RAW_ROW_GROUP = 1024  # rows per row group of a raw part

REJECT_SCHEMA = pa.schema([
    ("source_uri", pa.string()),
    ("label", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("source_split", pa.string()),
    ("duplicate_of", pa.string()),
])

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("label", pa.string()),
    ("split", pa.string()),
    ("unit", pa.string()),
    ("reason", pa.string()),
])
MANIFEST_META_KEY = b"keel.split"


# ---------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it into place only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temps(folder: str | Path) -> list[str]:
    """Delete what an interrupted :func:`atomic_path` left in ``folder`` (``.NAME.XXXX.tmp``; a SIGKILL skips the
    ``finally``). Only for a folder one writer owns (a persisted stage out, before that stage writes into it)."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


def write_json(dest: str | Path, obj) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_table(dest: str | Path, table: pa.Table, **kwargs) -> None:
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, **kwargs)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it into place when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            _rmtree(old)
    finally:
        if tmp.exists():
            _rmtree(tmp)


def _rmtree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- raw items
def raw_parts(raw_dir: str | Path) -> list[Path]:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: raw items not found; run `keel ingest` (or `dvc repro ingest`) first")
    parts = sorted(raw_dir.glob("part-*.parquet"))
    if not parts:
        raise DataError(f"{raw_dir}: no part-*.parquet files; the ingest stage found no readable items")
    return parts


def read_raw_meta(raw_dir: str | Path) -> pa.Table:
    """All raw-item columns except the image bytes (cheap: a few dozen bytes per item)."""
    tables = []
    for part in raw_parts(raw_dir):
        missing = [c for c in RAW_META_COLUMNS if c not in pq.read_schema(part).names]
        if missing:
            raise DataError(f"{part}: not a keel raw-items part (missing columns {missing}); re-run `keel ingest`")
        tables.append(pq.read_table(part, columns=RAW_META_COLUMNS))
    # column types are checked by the validate stage's expectations, which name the split and column
    return pa.concat_tables(tables, promote_options="permissive")


def read_raw_thumbs(raw_dir: str | Path) -> np.ndarray:
    """The ``thumb`` column of every raw item, in ``read_raw_meta``'s order: uint8 [N, 32, 32]."""
    parts = raw_parts(raw_dir)
    rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    out = np.empty((sum(rows), THUMB, THUMB), np.uint8)  # filled part by part: one copy in memory, not three
    at = 0
    for part, n in zip(parts, rows):
        if "thumb" not in pq.read_schema(part).names:
            raise DataError(f"{part}: raw items without the 'thumb' column (written by an older keel ingest); "
                            "re-run `keel ingest` (`dvc repro` does, since the ingest code changed)")
        col = pq.read_table(part, columns=["thumb"]).column("thumb")
        try:
            fixed = col.cast(pa.binary(THUMB * THUMB))  # fails on a value of the wrong length
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"{part}: a 'thumb' value is not {THUMB}x{THUMB} bytes ({exc}); re-run `keel ingest`") \
                from None
        if fixed.null_count:
            raise DataError(f"{part}: {fixed.null_count} raw item(s) without a thumbnail; re-run `keel ingest`")
        for chunk in fixed.chunks:
            data = np.frombuffer(chunk.buffers()[1], np.uint8)
            start = chunk.offset * THUMB * THUMB
            out[at:at + len(chunk)] = data[start:start + len(chunk) * THUMB * THUMB].reshape(-1, THUMB, THUMB)
            at += len(chunk)
    return out


def iter_raw_batches(raw_dir: str | Path, columns: list[str] | None = None,
                     batch_rows: int = 2048) -> Iterator[pa.RecordBatch]:
    """Stream raw items (bounded memory) part by part."""
    for part in raw_parts(raw_dir):
        pf = pq.ParquetFile(part)
        yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


# ---------------------------------------------------------------- split manifest
def manifest_sha_path(manifest: str | Path) -> Path:
    manifest = Path(manifest)
    return manifest.with_name(manifest.name + ".sha256")


def read_manifest(path: str | Path) -> tuple[pa.Table, dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: split manifest not found; run `keel split` first")
    table = pq.read_table(path)
    missing = set(MANIFEST_SCHEMA.names) - set(table.schema.names)
    if missing:
        raise DataError(f"{path}: not a keel split manifest (missing columns {sorted(missing)})")
    meta = json.loads((table.schema.metadata or {}).get(MANIFEST_META_KEY, b"{}"))
    return table.select(MANIFEST_SCHEMA.names), meta


def write_manifest(path: str | Path, table: pa.Table, meta: dict) -> str:
    table = table.cast(MANIFEST_SCHEMA).replace_schema_metadata({MANIFEST_META_KEY: json.dumps(meta).encode()})
    write_table(path, table)
    digest = sha256_file(path)
    write_text(manifest_sha_path(path), f"{digest}  {Path(path).name}\n")
    return digest


# ---------------------------------------------------------------- shards
@dataclass
class ShardFile:
    file: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    classes: list[str]
    resolution: int
    channels: int
    mean: list[float]
    std: list[float]
    manifest_sha256: str
    splits: dict[str, list[ShardFile]] = field(default_factory=dict)
    version: int = 1
    resize: str = "center_crop"  # how images were squared (tasks.core.imaging.preprocess); serving repeats it
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # alpha composited over this
    decode: str = "full"  # shard.decode; an index written before it was recorded decoded every pixel

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.splits.get(split, []))

    def to_json(self) -> dict:
        d = self.__dict__.copy()
        d["background"] = list(d["background"])
        d["splits"] = {k: [s.__dict__ for s in v] for k, v in self.splits.items()}
        return d

    @classmethod
    def load(cls, shards_dir: str | Path) -> ShardIndex:
        path = Path(shards_dir) / "index.json"
        if not path.exists():
            raise DataError(f"{path}: shard index not found; run `keel shard` first")
        try:
            d = json.loads(path.read_text())
            d["splits"] = {k: [ShardFile(**s) for s in v] for k, v in d["splits"].items()}
            return cls(**d)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: unreadable shard index ({exc}); re-run `keel shard`") from None


class TestSplitAccessError(PermissionError):
    """Raised when anything but the evaluate stage asks for the test shards."""


TEST_READER = "tasks.evaluate"
"""The ``reader_of`` that opens the sealed test split (an exact match: no other value, ``tasks.evaluate.<sub>``
included, is accepted). It is a declaration, not a lock: the contract is that only the evaluate package, which
records every read in its test-access ledger, passes it (from whichever of its modules reads), plus tests that
need the test rows to check evaluate's output. Stage code that passes it bypasses the ledger."""


class ShardReader:
    """Iterate one split's shards as (images uint8 [N,H,W,C], labels int64 [N], ids) batches.

    Checksums are verified before a shard is used; a mismatch raises ``DataError`` naming the shard.
    The test split is sealed: only the evaluate stage (``reader_of=TEST_READER``) may open it.
    """

    def __init__(self, shards_dir: str | Path, split: str, *, verify: bool = True, reader_of: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split == "test" and reader_of != TEST_READER:
            raise TestSplitAccessError(
                "the test split is sealed: only the evaluate stage reads it, once per model "
                "(select models on the val split)")
        self.dir = Path(shards_dir)
        self.split = split
        self.index = ShardIndex.load(self.dir)
        self.files = self.index.splits.get(split, [])
        if verify:
            self.verify()

    def verify(self) -> None:
        for s in self.files:
            path = self.dir / s.file
            if not path.exists():
                raise DataError(f"{path}: shard listed in index.json is missing; re-run `keel shard`")
            digest = sha256_file(path)
            if digest != s.sha256:
                raise DataError(f"{path}: checksum mismatch (index {s.sha256[:12]}…, file {digest[:12]}…); "
                                "the shard is corrupt or was modified; re-run `keel shard` (dvc checkout restores it)")

    def __len__(self) -> int:
        return sum(s.rows for s in self.files)

    def iter_batches(self, batch_rows: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        hwc = (self.index.resolution, self.index.resolution, self.index.channels)
        for s in self.files:
            path = self.dir / s.file
            try:
                pf = pq.ParquetFile(path)
                for batch in pf.iter_batches(batch_size=batch_rows):
                    yield decode_image_column(batch.column("image"), hwc), \
                        batch.column("label").to_numpy().astype(np.int64), batch.column("id").to_pylist()
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"{path}: corrupt shard ({exc}); re-run `keel shard`") from None

    def read_all(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        xs, ys, ids = [], [], []
        for x, y, i in self.iter_batches(batch_rows=8192):
            xs.append(x), ys.append(y), ids.extend(i)
        hwc = (self.index.resolution, self.index.resolution, self.index.channels)
        if not xs:
            return np.zeros((0, *hwc), np.uint8), np.zeros(0, np.int64), []
        return np.concatenate(xs), np.concatenate(ys), ids


def decode_image_column(col: pa.Array, hwc: tuple[int, int, int]) -> np.ndarray:
    """Zero-copy view of a fixed_size_binary image column as uint8 [N,H,W,C]."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    width = int(np.prod(hwc))
    buf = col.buffers()[1]
    arr = np.frombuffer(buf, dtype=np.uint8, count=(col.offset + n) * width)[col.offset * width:]
    return arr.reshape(n, *hwc)
