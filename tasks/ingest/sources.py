"""Where ingest finds items: builtin digits, a local folder, a CSV/parquet manifest, or an S3 prefix.

Each source yields ``Candidate`` rows: metadata plus a way to fetch bytes (a local path, an S3 key, or the bytes
themselves).  Problems that are known before any bytes are read (a path escaping the data root, a missing or
unknown label) come back as candidates with ``reject`` set, so that found = ingested + rejected always holds.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.core.errors import UserError

SPLIT_DIRS = ("train", "val", "test")


class SourceError(UserError):
    """The source as a whole cannot be read (missing, unreachable, access denied); the message says how to fix."""


@dataclass
class Candidate:
    uri: str
    label: str | None
    group: str | None = None
    source_split: str | None = None
    path: str | None = None          # local file to read (in a worker)
    s3: tuple[str, str] | None = None  # (bucket, key) to fetch (in a worker)
    data: bytes | None = None        # bytes already in hand (builtin)
    reject: tuple[str, str] | None = None  # (reason, detail) decided before reading


def candidates(source: str, *, root: str | None = None, s3_endpoint: str | None = None) -> list[Candidate]:
    """All candidates of ``source`` (metadata only; bytes are fetched later, in workers)."""
    if source == "builtin:digits":
        return _digits()
    if source.startswith("builtin:"):
        raise SourceError(f"ingest.source: unknown builtin {source!r}; the only builtin is 'builtin:digits'")
    if source.startswith("s3://"):
        return _s3_folder(source, s3_endpoint)
    path = Path(source)
    if not path.exists():
        raise SourceError(f"ingest.source: {source} does not exist (expected builtin:digits, a folder, "
                          "a .csv/.parquet manifest or s3://bucket/prefix)")
    if path.is_dir():
        return _folder(path)
    if path.suffix.lower() in (".csv", ".parquet"):
        return _manifest(path, Path(root) if root else path.parent, s3_endpoint)
    raise SourceError(f"ingest.source: {source} is a file but not a .csv or .parquet manifest")


# ---------------------------------------------------------------- builtin
def _digits() -> list[Candidate]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i, (img, target) in enumerate(zip(d.images, d.target)):
        # load_digits stores 0..16 intensities; keep them as an 8-bit grayscale PNG, the "original bytes".
        arr = np.round(img * (255.0 / 16.0)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(Candidate(uri=f"builtin:digits/{i:04d}", label=str(int(target)), data=buf.getvalue()))
    return out


# ---------------------------------------------------------------- local folder
def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _folder(root: Path) -> list[Candidate]:
    root_real = root.resolve()
    top = sorted(p.name for p in root.iterdir() if p.is_dir())
    has_split_level = bool(top) and set(top) <= set(SPLIT_DIRS)
    out: list[Candidate] = []
    seen_dirs: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        real = d.resolve()
        if not _inside(real, root_real):
            out.append(Candidate(uri=str(d.relative_to(root)), label=None,
                                 reject=("path_escapes_root", f"symlinked folder resolves to {real}, outside {root_real}")))
            dirnames[:] = []
            continue
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        rel_parts = d.relative_to(root).parts
        for name in sorted(filenames):
            f = d / name
            rel = f.relative_to(root)
            split, label = _layout(rel_parts, has_split_level)
            cand = Candidate(uri=rel.as_posix(), label=label, source_split=split, path=str(f))
            if f.is_symlink() and not _inside(f.resolve(), root_real):
                cand.reject = ("path_escapes_root", f"symlink resolves to {f.resolve()}, outside {root_real}")
            elif label is None:
                cand.reject = ("missing_label", "file is not inside a class folder (expected <class>/<file>"
                               + (" under train/ val/ or test/)" if has_split_level else ")"))
            out.append(cand)
    return out


def _layout(rel_dir_parts: tuple[str, ...], has_split_level: bool) -> tuple[str | None, str | None]:
    if has_split_level:
        if len(rel_dir_parts) >= 2:
            return rel_dir_parts[0], rel_dir_parts[1]
        return (rel_dir_parts[0] if rel_dir_parts else None), None
    return None, (rel_dir_parts[0] if rel_dir_parts else None)


# ---------------------------------------------------------------- manifest
def _manifest(path: Path, root: Path, s3_endpoint: str | None) -> list[Candidate]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".csv":
            opts = pacsv.ConvertOptions(strings_can_be_null=True, column_types=None)
            table = pacsv.read_csv(path, convert_options=opts)
        else:
            table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"{path}: cannot read manifest: {exc}") from None
    cols = set(table.column_names)
    loc_col = "path" if "path" in cols else "uri" if "uri" in cols else None
    if loc_col is None or "label" not in cols:
        raise SourceError(f"{path}: manifest needs columns (path or uri, label[, group][, split]); "
                          f"found {sorted(cols)}")
    locs = table.column(loc_col).to_pylist()
    labels = [None if v is None else str(v) for v in table.column("label").to_pylist()]
    groups = table.column("group").to_pylist() if "group" in cols else [None] * len(locs)
    splits = table.column("split").to_pylist() if "split" in cols else [None] * len(locs)
    root_real = root.resolve()
    out = []
    for row, (loc, label, group, split) in enumerate(zip(locs, labels, groups, splits), start=2 if path.suffix == ".csv" else 0):
        where = f"{path.name} row {row}"
        label = label.strip() if isinstance(label, str) and label.strip() else None
        group = str(group) if group not in (None, "") else None
        split = str(split).strip().lower() if split not in (None, "") else None
        cand = Candidate(uri=str(loc), label=label, group=group, source_split=split)
        if loc in (None, ""):
            cand.uri = f"{where}: (empty)"
            cand.reject = ("missing_path", f"{where}: the {loc_col} cell is empty")
        elif split is not None and split not in SPLIT_DIRS:
            cand.reject = ("unknown_split", f"{where}: split {split!r} is not one of {SPLIT_DIRS}")
        elif str(loc).startswith("s3://"):
            bucket, _, key = str(loc)[5:].partition("/")
            cand.s3 = (bucket, key)
        else:
            p = Path(str(loc))
            if p.is_absolute():
                cand.reject = ("path_escapes_root", f"{where}: absolute path; manifest paths must be relative to {root}")
            else:
                full = root / p
                real = full.resolve()
                if not _inside(real, root_real):
                    what = "symlink" if full.is_symlink() or any(q.is_symlink() for q in full.parents) else "path"
                    cand.reject = ("path_escapes_root", f"{where}: {what} resolves to {real}, outside data root {root_real}")
                elif not full.is_file():
                    cand.reject = ("missing_file", f"{where}: {full} does not exist")
                else:
                    cand.path = str(full)
        if cand.reject is None and label is None:
            cand.reject = ("missing_label", f"{where}: the label cell is empty")
        out.append(cand)
    if any(c.s3 for c in out):
        _check_s3_access({c.s3[0] for c in out if c.s3}, s3_endpoint, str(path))
    return out


# ---------------------------------------------------------------- S3
def s3_client(endpoint: str | None, *, retries: int = 5, connect_timeout: float = 10):
    """An S3 client from the current AWS_* variables / profile (``retries`` excludes the first attempt).

    A fresh boto3 session each time: the process-wide default session keeps the first credentials it resolved,
    so a corrected key (or a rotated secret) in the same process would otherwise go unnoticed.
    """
    import boto3.session
    from botocore.config import Config

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(
        retries={"max_attempts": retries, "mode": "standard"}, connect_timeout=connect_timeout))


# Listing and the bucket check run before any work: a wrong endpoint should fail in seconds, not after
# botocore's backoff over 5 retries (0-31 s of sleeps for a refused connection).
_PREFLIGHT = {"retries": 2, "connect_timeout": 5}


def explain_s3_error(exc: Exception, where: str, endpoint: str | None) -> SourceError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    ep = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
    if isinstance(exc, NoCredentialsError):
        return SourceError(f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           "(or an AWS profile)")
    if isinstance(exc, EndpointConnectionError):
        return SourceError(f"{where}: cannot reach the S3 endpoint {ep}; check ingest.s3_endpoint / AWS_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken"):
            return SourceError(f"{where}: S3 refused the credentials ({code}) at {ep}; check AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY and that this key may read the bucket")
        if code in ("NoSuchBucket", "404"):
            return SourceError(f"{where}: bucket does not exist at {ep} ({code})")
        return SourceError(f"{where}: S3 error {code}: {exc}")
    return SourceError(f"{where}: S3 error: {exc}")


def _check_s3_access(buckets: set[str], endpoint: str | None, where: str) -> None:
    client = s3_client(endpoint, **_PREFLIGHT)
    for b in sorted(buckets):
        try:
            client.head_bucket(Bucket=b)
        except Exception as exc:  # noqa: BLE001 - translated into a message that names the bucket
            raise explain_s3_error(exc, f"{where}: s3://{b}", endpoint) from None


def _s3_folder(uri: str, endpoint: str | None) -> list[Candidate]:
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise SourceError(f"ingest.source: {uri!r} has no bucket (expected s3://bucket/prefix)")
    prefix = prefix.strip("/")
    client = s3_client(endpoint, **_PREFLIGHT)
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
            keys.extend(o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/"))
    except Exception as exc:  # noqa: BLE001 - translated into a message that names the source
        raise explain_s3_error(exc, uri, endpoint) from None
    if not keys:
        raise SourceError(f"{uri}: no objects under this prefix (expected <class>/<file> or <split>/<class>/<file>)")
    rels = [k[len(prefix) + 1:] if prefix else k for k in keys]
    top = {r.split("/", 1)[0] for r in rels if "/" in r}
    has_split_level = bool(top) and top <= set(SPLIT_DIRS)
    out = []
    for key, rel in sorted(zip(keys, rels), key=lambda kv: kv[1]):
        parts = tuple(rel.split("/")[:-1])
        split, label = _layout(parts, has_split_level)
        cand = Candidate(uri=f"s3://{bucket}/{key}", label=label, source_split=split, s3=(bucket, key))
        if label is None:
            cand.reject = ("missing_label", "object is not under a class prefix")
        out.append(cand)
    return out
