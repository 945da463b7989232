"""Where ingest finds items: builtin digits, a local folder, a CSV/parquet manifest, or an S3 prefix.

Each source yields ``Candidate`` rows: metadata plus a way to fetch bytes (a local path, an S3 key, or the bytes
themselves).  Problems that are known before any bytes are read (a path escaping the data root, a missing or
unknown label, a hidden file) come back as candidates with ``reject`` set, so that found = ingested + rejected
always holds.  Problems with the source as a whole (no files, a layout that cannot be read unambiguously, labels
that differ only in case) are a ``SourceError``: guessing would train on wrong labels without a word.
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
    label_from: str | None = None    # where the label comes from ("folder cat/", "m.csv row 7"), for messages


def candidates(source: str, *, root: str | None = None, s3_endpoint: str | None = None) -> list[Candidate]:
    """All candidates of ``source`` (metadata only; bytes are fetched later, in workers)."""
    out = _list(source, root, s3_endpoint)
    if all(c.reject is not None and c.reject[0] == "hidden_file" for c in out):
        raise SourceError(f"ingest.source: no files found in {source} ({_empty_hint(source)})")
    _check_label_collisions(out)
    return out


def _empty_hint(source: str) -> str:
    if source.startswith("s3://"):
        return "no objects under this prefix outside hidden prefixes (names starting with '.'); " \
               "expected <class>/<file> or <split>/<class>/<file>"
    if Path(source).is_dir():
        return "hidden files and folders (names starting with '.') are skipped; " \
               "expected <class>/<file> or <split>/<class>/<file>"
    return "the manifest has no rows"


def _list(source: str, root: str | None, s3_endpoint: str | None) -> list[Candidate]:
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


def _hidden(name: str) -> bool:
    """Names starting with '.' (.ipynb_checkpoints, .DS_Store, .git) are tool litter, never classes or splits."""
    return name.startswith(".")


def _split_level(top: list[str], source: str, kind: str) -> bool:
    """True for a <split>/<class>/ layout.  A split folder beside any other folder is refused: read as class
    folders, every image would be labelled 'train' or 'test'; read as splits, the other folder's role is a guess."""
    splits = [t for t in top if t in SPLIT_DIRS]
    others = [t for t in top if t not in SPLIT_DIRS]
    if splits and others:
        kinds = kind + ("es" if kind.endswith("x") else "s")
        raise SourceError(
            f"{source}: found the split {kinds} {', '.join(t + '/' for t in splits)} and beside them "
            f"{', '.join(o + '/' for o in others)}; no other top-level {kind} may exist beside train/, val/ or test/: "
            "rename it (e.g. validation/ -> val/) or move it out of the source")
    return bool(splits)


def _folder(root: Path) -> list[Candidate]:
    root_real = root.resolve()
    top = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    has_split_level = _split_level(top, str(root), "folder")
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
        dirnames[:] = sorted(n for n in dirnames if not _hidden(n))
        rel_dir = d.relative_to(root)
        split, label, label_dir = _layout(rel_dir.parts, has_split_level)
        # per file, plain strings: str(d / name) and (d / name).relative_to(root).as_posix() without pathlib
        # (a third of the listing's time at 60k files)
        dir_str, rel_prefix = str(d), "".join(p + "/" for p in rel_dir.parts)
        for name in sorted(filenames):
            path = name if dir_str == "." else os.path.join(dir_str, name)
            uri = rel_prefix + name
            cand = Candidate(uri=uri, label=label, source_split=split, path=path, label_from=f"folder {label_dir}")
            if os.path.islink(path) and not _inside(Path(path).resolve(), root_real):
                cand.reject = ("path_escapes_root", f"symlink resolves to {Path(path).resolve()}, outside {root_real}")
            elif _hidden(name):
                cand.reject = ("hidden_file", (f"{uri}: hidden file (name starts with '.'), never an "
                                               "item; rename it without the dot if it is an image, or delete it"))
            elif label is None:
                cand.reject = ("missing_label", "file is not inside a class folder (expected <class>/<file>"
                               + (" under train/ val/ or test/)" if has_split_level else ")"))
            out.append(cand)
    return out


def _layout(rel_dir_parts: tuple[str, ...], has_split_level: bool) -> tuple[str | None, str | None, str]:
    """(split, label, the class folder as 'a/b/') of a file in the folder ``rel_dir_parts``; a label is stripped of
    surrounding spaces (a folder 'cat ' is the class 'cat')."""
    split = (rel_dir_parts[0] if rel_dir_parts else None) if has_split_level else None
    n = 2 if has_split_level else 1
    label = (rel_dir_parts[n - 1].strip() or None) if len(rel_dir_parts) >= n else None
    return split, label, "".join(p + "/" for p in rel_dir_parts[:n])


def _label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def _check_label_collisions(cands: list[Candidate]) -> None:
    """Labels equal but for case or inner spacing ('Cat' and 'cat') are one class a person meant; as two classes
    they would split its items and teach the model a difference that is not there."""
    by_key: dict[str, dict[str, dict[str, None]]] = {}  # key -> label -> where (first few, in order)
    counts: dict[str, int] = {}
    for c in cands:
        if c.label is None:
            continue
        wheres = by_key.setdefault(_label_key(c.label), {}).setdefault(c.label, {})
        if c.label_from not in wheres:
            counts[c.label] = counts.get(c.label, 0) + 1
            if len(wheres) < 3:
                wheres[c.label_from] = None
    clashes = []
    for labels in by_key.values():
        if len(labels) > 1:
            clashes.append(", ".join(
                f"{lab!r} ({', '.join(str(w) for w in wheres)}"
                + (f" and {counts[lab] - len(wheres)} more" if counts[lab] > len(wheres) else "") + ")"
                for lab, wheres in sorted(labels.items())))
    if clashes:
        raise SourceError("ingest.source: labels that differ only in case or spacing would become separate classes: "
                          + "; ".join(clashes) + ". Merge them into one class (one folder, or one spelling in the "
                          "manifest) or rename one so that the names really differ")


# ---------------------------------------------------------------- manifest
_MANIFEST_COLUMNS = ("path", "uri", "label", "group", "split")


def _manifest(path: Path, root: Path, s3_endpoint: str | None) -> list[Candidate]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".csv":
            # every cell as text: type inference would merge labels '001' and '1', turn '0' into '0.0' in a column
            # with an empty cell and 'true' into 'True'; only an empty cell is null ('NA' may be a class)
            opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in _MANIFEST_COLUMNS},
                                        strings_can_be_null=True, null_values=[""])
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
    label_type = table.schema.field("label").type
    value_type = label_type.value_type if pa.types.is_dictionary(label_type) else label_type
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type) or pa.types.is_integer(value_type)):
        raise SourceError(f"{path}: column 'label' has type {label_type}; labels must be strings or integers (a "
                          f"{label_type} label would become text such as '1.0' or 'True'): write the column as strings")
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
        cand = Candidate(uri=str(loc), label=label, group=group, source_split=split, label_from=where)
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
                    cand.reject = ("missing_file", f"{where}: {full} " + ("is a folder, not an image file"
                                                                        if full.is_dir() else "does not exist"))
                else:
                    cand.path = str(full)
        if cand.reject is None and label is None:
            cand.reject = ("missing_label", f"{where}: the label cell is empty")
        out.append(cand)
    if any(c.s3 for c in out):
        _check_s3_access({c.s3[0] for c in out if c.s3}, s3_endpoint, str(path))
    return out


# ---------------------------------------------------------------- S3
def s3_client(endpoint: str | None, *, retries: int = 5, connect_timeout: float = 10, read_timeout: float = 60):
    """An S3 client from the current AWS_* variables / profile (``retries`` excludes the first attempt).

    A fresh boto3 session each time: the process-wide default session keeps the first credentials it resolved,
    so a corrected key (or a rotated secret) in the same process would otherwise go unnoticed.
    """
    import boto3.session
    from botocore.config import Config

    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=Config(
        retries={"max_attempts": retries, "mode": "standard"}, connect_timeout=connect_timeout,
        read_timeout=read_timeout))


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
    rels = [k[len(prefix) + 1:] if prefix else k for k in keys]
    # objects under a hidden prefix (.ipynb_checkpoints/...) are not items, as a hidden folder is not descended
    listed = [(k, r) for k, r in zip(keys, rels) if not any(_hidden(p) for p in r.split("/")[:-1])]
    top = sorted({r.split("/", 1)[0] for _, r in listed if "/" in r})
    has_split_level = _split_level(top, uri, "prefix")
    base = f"s3://{bucket}/{prefix + '/' if prefix else ''}"
    out = []
    for key, rel in sorted(listed, key=lambda kv: kv[1]):
        parts = tuple(rel.split("/")[:-1])
        split, label, label_dir = _layout(parts, has_split_level)
        cand = Candidate(uri=f"s3://{bucket}/{key}", label=label, source_split=split, s3=(bucket, key),
                         label_from=f"prefix {base}{label_dir}")
        if _hidden(rel.rsplit("/", 1)[-1]):
            cand.reject = ("hidden_file", (f"{cand.uri}: hidden object (name starts with '.'), never an item; "
                                           "rename it without the dot if it is an image, or delete it"))
        elif label is None:
            cand.reject = ("missing_label", "object is not under a class prefix")
        out.append(cand)
    return out


# Fetch failures that pass (a throttling, overloaded or restarting server, a dropped connection, an expired
# session token) after botocore's own retries: the stage fails so that it is retried whole later, instead of
# "succeeding" on a smaller dataset.  The words are those tasks.core.retry recognises as transient.
_TRANSIENT_CODES = {
    "SlowDown": "throttled: slow down", "Throttling": "throttled: slow down",
    "ThrottlingException": "throttled: slow down", "RequestLimitExceeded": "throttled: slow down",
    "TooManyRequests": "throttled: slow down", "429": "throttled: slow down",
    "ServiceUnavailable": "service unavailable", "503": "service unavailable",
    "InternalError": "server error", "500": "server error", "502": "server error", "BadGateway": "server error",
    "504": "gateway timed out", "GatewayTimeout": "gateway timed out",
    "RequestTimeout": "request timed out", "RequestTimeoutException": "request timed out",
    "ExpiredToken": "the session token expired; a retry picks up refreshed credentials",
    "ExpiredTokenException": "the session token expired; a retry picks up refreshed credentials",
}

# read_timeout included: a stalled server must end in an error, not hang the stage
FETCH = {"retries": 5, "connect_timeout": 10, "read_timeout": 60}


def transient_fetch_error(exc: Exception, uri: str, endpoint: str | None) -> SourceError | None:
    """The error that fails the stage for a fetch of ``uri`` that failed for a passing reason, or None for a
    permanent failure of this one object (NoSuchKey, AccessDenied: the object becomes a reject)."""
    from botocore import exceptions as bx

    ep = endpoint or "the AWS default endpoint"
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        meta = exc.response.get("ResponseMetadata", {})
        status = meta.get("HTTPStatusCode")
        what = _TRANSIENT_CODES.get(code) or (_TRANSIENT_CODES.get(str(status)) if status else None)
        if what is None:
            return None
        attempts = f"{meta.get('RetryAttempts', 0) + 1} attempts"
        code = f"{code} (HTTP {status})" if status else code
    elif isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError | TimeoutError):
        code, what, attempts = type(exc).__name__, "timed out", f"{FETCH['retries']} retries"
    elif isinstance(exc, bx.EndpointConnectionError):
        code, what, attempts = type(exc).__name__, "could not connect", f"{FETCH['retries']} retries"
    elif isinstance(exc, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError | ConnectionError):
        code, what, attempts = type(exc).__name__, "connection reset or lost", f"{FETCH['retries']} retries"
    else:
        return None
    return SourceError(f"{uri}: transient S3 error {code} at {ep} after {attempts} ({what}): {exc}. Ingest "
                       "stopped and wrote no raw items rather than drop the object; run the stage again (the flow "
                       f"retries it by itself), and if it persists check the S3 service at {ep}")
