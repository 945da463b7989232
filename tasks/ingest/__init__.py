"""ingest: turn a source into the raw items table, a rejects table and a data audit.

Every candidate the source lists ends up in exactly one of the two tables (found = ingested + rejected); the
stage prints that account.  Ids are content addresses (sha256 of the original bytes), so the same image under two
names is one item: the second copy is recorded as a reject (``duplicate_bytes``) naming the kept id, unless the
copies carry different labels: then no copy is ingested (``conflicting_labels``), since which label is right is
not ingest's guess.  A source with fewer than two classes, or an S3 fetch that fails for a passing reason (after
botocore's retries), fails the stage instead of yielding a smaller or a one-class dataset.
Candidates are processed in a fixed pseudo-random order (by a hash of their URI): raw parts, and the shards
cut from them, are then not sorted by class, and the result does not depend on directory listing order.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import io, neardup
from tasks.core import progress as prog
from tasks.core.config import IngestConfig, Paths
from tasks.core.imaging import ImageRejected, decode, feature_pixels, features, to_gray
from tasks.core.parallel import ExecutorSpec, bounded_map, chunked
from tasks.ingest import sources

# Stable reject reason codes (the rejects table's ``reason`` column).
REASONS = {
    "empty_file": "zero-byte file",
    "not_an_image": "bytes no image decoder recognises (e.g. text with a .jpg name)",
    "corrupt_image": "decoder failed part-way (truncated or damaged file)",
    "decompression_bomb": "more pixels than ingest.max_pixels",
    "format_not_allowed": "image format not in ingest.allowed_formats",
    "too_small": "a side shorter than ingest.min_side",
    "unsupported_mode": "pixel mode with no normalisation rule (e.g. 32-bit float)",
    "alpha_not_allowed": "transparent image while ingest.alpha=reject",
    "missing_label": "no label (file outside a class folder, or empty label cell)",
    "unknown_label": "label not in ingest.classes",
    "unknown_split": "manifest split not train/val/test",
    "missing_path": "manifest row without a path",
    "missing_file": "manifest path does not exist",
    "path_escapes_root": "path or symlink resolving outside the data root",
    "read_error": "the file or object could not be read",
    "duplicate_bytes": "byte-identical to an item already ingested (same id)",
    "conflicting_labels": "byte-identical copies with different labels: none of them is ingested",
    "hidden_file": "name starts with '.' (tool litter such as .DS_Store), never an item",
}


@dataclass
class IngestResult:
    found: int
    ingested: int
    rejected: int
    reject_counts: dict[str, int]
    seconds: float


_WORKER: dict = {}


def _init_worker(decode_kwargs: dict, s3_endpoint: str | None) -> None:
    _WORKER.clear()
    _WORKER.update(decode_kwargs=decode_kwargs, s3_endpoint=s3_endpoint, s3=None)


def _fetch(c: sources.Candidate) -> bytes:
    if c.data is not None:
        return c.data
    if c.path is not None:
        with open(c.path, "rb") as f:
            return f.read()
    if _WORKER.get("s3") is None:
        _WORKER["s3"] = sources.s3_client(_WORKER["s3_endpoint"], **sources.FETCH)
    bucket, key = c.s3
    return _WORKER["s3"].get_object(Bucket=bucket, Key=key)["Body"].read()


def _thumbnail(gray) -> bytes:
    """``neardup.thumbnail``, without its round trip through PIL when the image already is the thumbnail's size."""
    if gray.shape == (neardup.THUMB, neardup.THUMB) and gray.dtype == np.uint8:
        return gray.tobytes()
    return neardup.thumbnail(gray)


def _process_chunk(chunk: list[sources.Candidate]) -> list[tuple[dict | None, tuple[str, str] | None]]:
    out = []
    for c in chunk:
        try:
            data = _fetch(c)
        except Exception as exc:  # noqa: BLE001 - an unreadable item is a reject with the reason, never a crash
            if c.s3 is not None:
                client = _WORKER.get("s3")
                transient = sources.transient_fetch_error(exc, c.uri, client.meta.endpoint_url if client else None)
                if transient is not None:  # not this object's fault: fail the stage, the flow retries it
                    raise transient from None
            code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code") if c.s3 else None
            reason = "missing_file" if code in ("NoSuchKey", "404") else "read_error"
            out.append((None, (reason, f"{type(exc).__name__}: {exc}")))
            continue
        try:
            d = decode(data, **_WORKER["decode_kwargs"])
            gray = to_gray(feature_pixels(d.pixels))  # once, for the features and the thumbnail
            brightness, contrast, pixel_sha, ph = features(d.pixels, gray)
            thumb = _thumbnail(gray)
        except ImageRejected as r:
            out.append((None, (r.reason, r.detail)))
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not lose the other items
            out.append((None, ("corrupt_image", f"decoder raised {type(exc).__name__}: {exc}")))
            continue
        out.append(({
            "id": hashlib.sha256(data).hexdigest(), "image": data, "label": c.label, "source_uri": c.uri,
            "group": c.group, "source_split": c.source_split, "format": d.format, "width": d.width,
            "height": d.height, "mode": d.mode, "channels": d.channels, "brightness": brightness,
            "contrast": contrast, "pixel_sha": pixel_sha, "phash": ph, "thumb": thumb,
        }, None))
    return out


def run(cfg: IngestConfig, paths: Paths) -> IngestResult:
    t0 = time.monotonic()
    cands = sources.candidates(cfg.source, root=cfg.root, s3_endpoint=cfg.s3_endpoint)
    cands.sort(key=lambda c: hashlib.sha1(c.uri.encode()).digest())
    declared = set(cfg.classes) if cfg.classes else None

    rejects: list[dict] = []

    def reject(c: sources.Candidate, reason: str, detail: str, duplicate_of: str | None = None) -> None:
        rejects.append({"source_uri": c.uri, "label": c.label, "reason": reason, "detail": detail,
                        "source_split": c.source_split, "duplicate_of": duplicate_of})

    todo = []
    for c in cands:
        if c.reject is not None:
            reject(c, *c.reject)
        elif declared is not None and c.label not in declared:
            reject(c, "unknown_label", f"label {c.label!r} not in ingest.classes {sorted(declared)}")
        else:
            todo.append(c)

    decode_kwargs = {"max_pixels": cfg.max_pixels, "allowed_formats": cfg.allowed_formats, "alpha": cfg.alpha,
                     "min_side": cfg.min_side}
    seen: dict[str, sources.Candidate] = {}           # id -> the copy kept
    copies: dict[str, list[sources.Candidate]] = {}  # id -> every copy, for ids met more than once
    ingested = 0
    with io.atomic_dir(paths.raw_items) as tmp_dir, \
            prog.progress(total=len(cands), initial=len(cands) - len(todo), desc="ingest", unit="item") as bar:
        writer = _PartWriter(tmp_dir, cfg.part_rows)
        # the same chunking twice: one stream goes to the workers, the other pairs each result with its candidates
        for chunk, results in zip(chunked(todo, 64),
                                  bounded_map(_process_chunk, chunked(todo, 64), cfg.workers,
                                              initializer=_init_worker, initargs=(decode_kwargs, cfg.s3_endpoint),
                                              executor=ExecutorSpec.of(cfg, "ingest"))):
            for c, (row, rej) in zip(chunk, results):
                if rej is not None:
                    reject(c, *rej)
                    continue
                first = seen.get(row["id"])
                if first is not None:
                    copies.setdefault(row["id"], [first]).append(c)
                    kept_c = first
                    if _RANK.get(c.source_split, 0) > _RANK.get(first.source_split, 0):
                        # a test (or val) copy of an item kept from a lower split: the test copy is the item
                        writer.replace(row["id"], row)
                        seen[row["id"]] = c
                        kept_c, c = c, first
                        rejects[:] = [r if r.get("duplicate_of") != row["id"] else
                                      {**r, "detail": _dup_detail(row["id"], kept_c, r)} for r in rejects]
                    reject(c, "duplicate_bytes", _dup_detail(row["id"], kept_c, {"label": c.label,
                                                                                  "source_split": c.source_split}),
                           duplicate_of=row["id"])
                    continue
                seen[row["id"]] = c
                writer.add(row)
                ingested += 1
            bar.set_postfix(rejected=len(rejects), refresh=False)
            bar.update(len(chunk))
        ingested -= _reject_conflicts(copies, seen, writer, rejects, reject)
        writer.close()
        # inside atomic_dir: a broken account (a bug) leaves no raw table that looks finished
        if ingested + len(rejects) != len(cands):
            raise RuntimeError(f"ingest: internal error: the account does not balance: found {len(cands)} != "
                               f"ingested {ingested} + rejected {len(rejects)}; some item was lost without a "
                               "reason (a bug in keel: please report it)")
        if ingested == 0:
            _write_rejects(paths.rejects, rejects)  # the reasons are the useful part of this failure
            raise io.DataError(f"ingest: none of the {len(cands)} items from {cfg.source} could be ingested; "
                               f"see the reasons in {paths.rejects}")
        labels = {c.label for c in seen.values()}
        if len(labels) < 2:
            _write_rejects(paths.rejects, rejects)
            raise io.DataError(f"ingest: only one class: all {ingested} ingested items from {cfg.source} have "
                               f"label {next(iter(labels))!r}; a classifier needs at least two classes. Add items "
                               "of another class (or check the folder layout, the manifest's label column and "
                               f"ingest.classes); the rejects are in {paths.rejects}")
    _write_rejects(paths.rejects, rejects)

    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    result = IngestResult(len(cands), ingested, len(rejects), dict(sorted(counts.items())), time.monotonic() - t0)
    from tasks.ingest import audit  # plotting imports are only paid when the audit is written

    audit.write_audit(cfg, paths, result)
    print(f"ingest: found {result.found} = ingested {result.ingested} + rejected {result.rejected}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in result.reject_counts.items())})" if result.rejected else ""))
    prog.summary("ingest", result.found, result.reject_counts, time.monotonic() - t0)
    return result


_RANK = {"train": 1, "val": 2, "test": 3}  # which byte-identical copy is kept: the one from the highest split


def _dup_detail(item_id: str, kept: sources.Candidate, copy: dict) -> str:
    where = f" ({kept.source_split} copy kept, this {copy['source_split']} copy dropped)" \
        if kept.source_split != copy["source_split"] else ""
    return f"same bytes as id {item_id[:16]}… from {kept.uri}{where}"  # same label: copies with others conflict


def _reject_conflicts(copies: dict[str, list[sources.Candidate]], seen: dict, writer: _PartWriter,
                      rejects: list[dict], reject) -> int:
    """Byte-identical copies with different labels: every copy becomes a conflicting_labels reject (in place of
    the duplicate_bytes ones) and the kept row is dropped; returns how many ingested items that removed."""
    conflicted = {i: cs for i, cs in copies.items() if len({c.label for c in cs}) > 1}
    rejects[:] = [r for r in rejects if r["duplicate_of"] not in conflicted]
    for item_id, cs in conflicted.items():
        writer.drop(item_id)
        del seen[item_id]
        detail = _conflict_detail(item_id, cs)
        for c in cs:
            reject(c, "conflicting_labels", detail)
    return len(conflicted)


def _conflict_detail(item_id: str, cs: list[sources.Candidate]) -> str:
    listed = ", ".join(f"{c.uri} (label {c.label!r})" for c in cs)
    return (f"byte-identical copies (id {item_id[:16]}…) carry different labels: {listed}; none was ingested: "
            "correct the wrong label(s), or delete the wrong copy, and re-run ingest")


def _raw_table(rows: list[dict]) -> pa.Table:
    """Row dicts -> a raw-items table, column by column (the same table as ``from_pylist``, 3x faster)."""
    return pa.Table.from_pydict({name: [r[name] for r in rows] for name in io.RAW_SCHEMA.names}, schema=io.RAW_SCHEMA)


def _write_rejects(path: str, rejects: list[dict]) -> None:
    table = pa.Table.from_pylist(rejects, schema=io.REJECT_SCHEMA) if rejects else io.REJECT_SCHEMA.empty_table()
    io.write_table(path, table)


class _PartWriter:
    """Writes raw rows to part-NNNNN.parquet files of at most ``part_rows`` rows, a row group at a time.

    Memory stays at one row group of rows (the originals of 384 px photos are ~15 KB each; a whole part held
    and converted at once was 300 MB of fresh memory, and fresh memory is what a VM pays most for)."""

    # large originals (e.g. 5 MB photos) must not pile up: a part is also closed at this many image bytes
    MAX_PART_BYTES = 256 << 20

    def __init__(self, out_dir: Path, part_rows: int):
        self.dir, self.part_rows = Path(out_dir), part_rows
        self.rows: list[dict] = []            # added, not yet written (at most one row group)
        self.n = 0                            # the part being written
        self.writer: pq.ParquetWriter | None = None
        self.part_count = self.part_bytes = 0  # rows and image bytes of part n so far (written + buffered)
        self.where: dict[str, int] = {}      # id -> part number
        self.replaced: dict[str, dict] = {}  # id -> replacement row, applied to written parts at close
        self.dropped: set[str] = set()       # ids to remove from written parts at close

    def replace(self, item_id: str, row: dict) -> None:
        """Swap the row of an id already added for another copy of the same bytes (same id, other source)."""
        for i, r in enumerate(self.rows):
            if r["id"] == item_id:
                self.rows[i] = row
                return
        self.replaced[item_id] = row

    def drop(self, item_id: str) -> None:
        """Remove the row of an id already added (byte-identical copies whose labels conflict: none is kept)."""
        self.replaced.pop(item_id, None)
        for i, r in enumerate(self.rows):
            if r["id"] == item_id:
                del self.rows[i]
                return
        self.dropped.add(item_id)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.where[row["id"]] = self.n
        self.part_count += 1
        self.part_bytes += len(row["image"])
        if len(self.rows) >= io.RAW_ROW_GROUP:
            self._write_rows()
        if self.part_count >= self.part_rows or self.part_bytes >= self.MAX_PART_BYTES:
            self._end_part()

    def _write_rows(self) -> None:
        if not self.rows:
            return
        if self.writer is None:
            self.writer = pq.ParquetWriter(self._path(self.n), io.RAW_SCHEMA, compression=io.RAW_COMPRESSION)
        self.writer.write_table(_raw_table(self.rows), row_group_size=io.RAW_ROW_GROUP)
        self.rows = []

    def _end_part(self) -> None:
        self._write_rows()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.n += 1
        self.part_count = self.part_bytes = 0

    def _path(self, n: int) -> Path:
        return self.dir / f"part-{n:05d}.parquet"

    def close(self) -> None:
        self._end_part()
        by_part: dict[int, dict[str, dict | None]] = {}  # part -> id -> replacement row (None: drop it)
        for item_id, row in self.replaced.items():
            by_part.setdefault(self.where[item_id], {})[item_id] = row
        for item_id in self.dropped:
            by_part.setdefault(self.where[item_id], {})[item_id] = None
        for n, rows in sorted(by_part.items()):  # rare (cross-split copies, conflicts): rewrite just those parts
            path = self._path(n)
            table = [rows.get(r["id"], r) for r in pq.read_table(path).to_pylist()]
            table = [r for r in table if r is not None]
            if table:
                pq.write_table(_raw_table(table), path, row_group_size=io.RAW_ROW_GROUP,
                               compression=io.RAW_COMPRESSION)
            else:
                path.unlink()
