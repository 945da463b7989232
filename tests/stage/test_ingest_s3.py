"""Ingest from S3 against a real S3 API (SeaweedFS on loopback, which checks SigV4 credentials): class-per-prefix
and split-level layouts, the process pool, s3:// manifests, and the messages for refused credentials, a missing
bucket and an endpoint nobody listens on.
"""
from __future__ import annotations

import hashlib
import io
import socket

import boto3
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import ingest
from tasks.core import io as kio
from tasks.core.config import IngestConfig, Paths
from tasks.ingest import sources
from tests.support.s3server import s3_with_bucket, seaweed_s3

pytestmark = pytest.mark.slow

BUCKET = "keel-ingest-test"
CLASSES = ("cat", "dog")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3():
    with s3_with_bucket(BUCKET) as server:
        yield server


@pytest.fixture
def aws_env(s3, monkeypatch, tmp_path):
    """The test server's credentials in the environment (where ingest and its worker processes read them),
    and nothing from the machine's own AWS set-up (profiles, config files, instance metadata, proxies)."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    # sources.s3_client uses boto3's process-wide default session, which keeps the first credentials it
    # resolved: without a fresh one, a test would run with whatever key an earlier test left behind.
    # (See test_s3_credentials_changed_in_process_are_used for that behaviour itself.)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    return s3


def _paths(base) -> Paths:
    return Paths(raw_items=str(base / "raw" / "items"), rejects=str(base / "raw" / "rejects.parquet"),
                 audit_dir=str(base / "audit"), split_manifest=str(base / "split" / "manifest.parquet"),
                 leakage_report=str(base / "leakage.json"),
                 leakage_picture=str(base / "leakage.png"), validate_dir=str(base / "validate"),
                 shards_dir=str(base / "shards"))


def _image(seed: int, fmt: str) -> bytes:
    """A tiny image whose bytes differ from every other seed's (ingest drops byte-identical duplicates)."""
    img = Image.new("RGB", (12, 10), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    img.putpixel((seed % 12, seed % 10), (255 - (seed % 256), 0, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _upload(client, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)


def _uri(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def flat_tree(s3):
    """prefix/<class>/...: 2 classes x 5 images (PNG and JPEG, one key with a space and a non-ASCII letter),
    plus a zero-byte x.jpg and a text file named y.png.  Returns (good {key: (label, bytes)}, bad {key: reason})."""
    good: dict[str, tuple[str, bytes]] = {}
    seed = 0
    for label in CLASSES:
        for i in range(5):
            seed += 1
            fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
            name = f"img {i} é.{ext}" if i == 4 else f"img{i}.{ext}"
            good[f"prefix/{label}/{name}"] = (label, _image(seed, fmt))
    bad_bytes = {"prefix/cat/x.jpg": b"", "prefix/dog/y.png": b"this is text, not a PNG\n"}
    bad = {"prefix/cat/x.jpg": "empty_file", "prefix/dog/y.png": "not_an_image"}
    _upload(s3.client(), {k: b for k, (_, b) in good.items()} | bad_bytes)
    return good, bad


@pytest.fixture(scope="module")
def split_tree(s3):
    """p2/<split>/<class>/...: train and test, 2 images per class each.  Returns {key: (split, label)}."""
    objects, expected = {}, {}
    seed = 100
    for split in ("train", "test"):
        for label in CLASSES:
            for i in range(2):
                seed += 1
                key = f"p2/{split}/{label}/{i}.png"
                objects[key] = _image(seed, "PNG")
                expected[key] = (split, label)
    _upload(s3.client(), objects)
    return expected


def _raw(paths: Paths):
    return kio.read_raw_meta(paths.raw_items)


def _rejects(paths: Paths):
    return pq.read_table(paths.rejects)


# ---------------------------------------------------------------- class-per-prefix tree
def test_s3_prefix_ingests_images_and_rejects_bad_objects(aws_env, flat_tree, tmp_path):
    good, bad = flat_tree
    paths = _paths(tmp_path)
    cfg = IngestConfig(source=f"s3://{BUCKET}/prefix", s3_endpoint=aws_env.endpoint, workers=1)

    result = ingest.run(cfg, paths)

    assert result.found == len(good) + len(bad) == result.ingested + result.rejected
    assert (result.ingested, result.rejected) == (len(good), len(bad))
    assert result.reject_counts == {"empty_file": 1, "not_an_image": 1}

    raw = _raw(paths)
    got = {r["source_uri"]: r for r in raw.to_pylist()}
    assert set(got) == {_uri(k) for k in good}
    for key, (label, data) in good.items():
        row = got[_uri(key)]
        assert row["label"] == label
        assert row["id"] == hashlib.sha256(data).hexdigest()  # the object's bytes, unchanged
        assert row["source_split"] is None
        assert row["format"] == ("PNG" if key.endswith(".png") else "JPEG")
        assert (row["width"], row["height"]) == (12, 10)

    rejects = {r["source_uri"]: r for r in _rejects(paths).to_pylist()}
    assert {u: r["reason"] for u, r in rejects.items()} == {_uri(k): reason for k, reason in bad.items()}
    assert rejects[_uri("prefix/cat/x.jpg")]["label"] == "cat"


def test_s3_split_level_sets_source_split(aws_env, split_tree, tmp_path):
    paths = _paths(tmp_path)
    result = ingest.run(IngestConfig(source=f"s3://{BUCKET}/p2/", s3_endpoint=aws_env.endpoint, workers=1), paths)

    assert (result.found, result.ingested, result.rejected) == (len(split_tree), len(split_tree), 0)
    got = {r["source_uri"]: (r["source_split"], r["label"]) for r in _raw(paths).to_pylist()}
    assert got == {_uri(k): v for k, v in split_tree.items()}
    assert _rejects(paths).num_rows == 0


def test_s3_process_pool_gives_the_same_tables(aws_env, flat_tree, tmp_path):
    """workers=2: spawned workers build their own boto3 client from the environment; same result as inline."""
    tables = {}
    for workers in (1, 2):
        paths = _paths(tmp_path / f"w{workers}")
        result = ingest.run(IngestConfig(source=f"s3://{BUCKET}/prefix", s3_endpoint=aws_env.endpoint,
                                         workers=workers), paths)
        assert result.found == result.ingested + result.rejected == 12
        raw = pq.read_table(paths.raw_items)  # every column, the image bytes included
        tables[workers] = (raw.sort_by("id"), _rejects(paths).sort_by("source_uri"))
    assert tables[2][0].num_rows == 10
    assert tables[2][0].equals(tables[1][0])
    assert tables[2][1].equals(tables[1][1])


# ---------------------------------------------------------------- errors that name the fix
@pytest.mark.parametrize("which", ["access_key", "secret_key"])
def test_s3_wrong_credentials_are_named(aws_env, flat_tree, tmp_path, monkeypatch, which):
    var = "AWS_ACCESS_KEY_ID" if which == "access_key" else "AWS_SECRET_ACCESS_KEY"
    monkeypatch.setenv(var, "WRONG" + getattr(aws_env, which))
    cfg = IngestConfig(source=f"s3://{BUCKET}/prefix", s3_endpoint=aws_env.endpoint, workers=1)
    with pytest.raises(sources.SourceError, match=r"refused the credentials.*AWS_ACCESS_KEY_ID"):
        ingest.run(cfg, _paths(tmp_path))
    assert not (tmp_path / "raw" / "items").exists()


def test_s3_credentials_changed_in_process_are_used(aws_env, flat_tree, tmp_path, monkeypatch):
    source = f"s3://{BUCKET}/prefix"
    assert len(sources.candidates(source, s3_endpoint=aws_env.endpoint)) == 12  # resolves the good key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "revoked-secret")
    with pytest.raises(sources.SourceError, match=r"refused the credentials"):
        ingest.run(IngestConfig(source=source, s3_endpoint=aws_env.endpoint, workers=1), _paths(tmp_path))


def test_s3_missing_credentials_are_named(aws_env, flat_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cfg = IngestConfig(source=f"s3://{BUCKET}/prefix", s3_endpoint=aws_env.endpoint, workers=1)
    with pytest.raises(sources.SourceError, match=r"no S3 credentials.*AWS_ACCESS_KEY_ID"):
        ingest.run(cfg, _paths(tmp_path))


def test_s3_missing_bucket_is_named(aws_env, tmp_path):
    cfg = IngestConfig(source="s3://no-such-bucket-keel/prefix", s3_endpoint=aws_env.endpoint, workers=1)
    with pytest.raises(sources.SourceError, match=r"s3://no-such-bucket-keel/prefix: bucket does not exist"):
        ingest.run(cfg, _paths(tmp_path))


def test_s3_empty_prefix_is_named(aws_env, flat_tree, tmp_path):
    cfg = IngestConfig(source=f"s3://{BUCKET}/nothing-here", s3_endpoint=aws_env.endpoint, workers=1)
    with pytest.raises(sources.SourceError, match=r"no objects under this prefix"):
        ingest.run(cfg, _paths(tmp_path))


def _dead_endpoint() -> str:
    """A loopback port nobody listens on (bound then released: connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def no_retry_sleep(monkeypatch):
    """botocore's backoff between retries of a refused connection adds up to 0-31 s with sources.s3_client's
    retry budget (5 retries, standard mode); the retries still happen, only the sleeps between them go."""
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def test_s3_unreachable_endpoint_is_named(aws_env, tmp_path, no_retry_sleep):
    endpoint = _dead_endpoint()
    cfg = IngestConfig(source=f"s3://{BUCKET}/prefix", s3_endpoint=endpoint, workers=1)
    with pytest.raises(sources.SourceError, match=rf"cannot reach the S3 endpoint {endpoint}"):
        ingest.run(cfg, _paths(tmp_path))


# ---------------------------------------------------------------- manifest with s3:// URIs
def _write_manifest(path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["path,label,group"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_manifest_with_s3_uris(aws_env, flat_tree, tmp_path):
    good, _ = flat_tree
    # Labels come from the manifest, not from the prefix the object happens to sit under.
    rows = [(_uri(k), "feline" if lab == "cat" else "canine", f"g{i // 2}")
            for i, (k, (lab, _)) in enumerate(sorted(good.items()))]
    missing = _uri("prefix/cat/not-uploaded.png")
    manifest = tmp_path / "manifest.csv"
    _write_manifest(manifest, rows + [(missing, "feline", "g9")])
    paths = _paths(tmp_path / "out")

    result = ingest.run(IngestConfig(source=str(manifest), s3_endpoint=aws_env.endpoint, workers=1), paths)

    assert (result.found, result.ingested, result.rejected) == (len(rows) + 1, len(rows), 1)
    got = {r["source_uri"]: (r["label"], r["group"], r["id"]) for r in _raw(paths).to_pylist()}
    assert got == {uri: (label, group, hashlib.sha256(good[uri[len(f"s3://{BUCKET}/"):]][1]).hexdigest())
                   for uri, label, group in rows}
    (rej,) = _rejects(paths).to_pylist()
    assert rej["source_uri"] == missing
    assert rej["reason"] == "missing_file" and "NoSuchKey" in rej["detail"]


def test_manifest_with_s3_uris_wrong_credentials(aws_env, flat_tree, tmp_path, monkeypatch):
    good, _ = flat_tree
    manifest = tmp_path / "manifest.csv"
    _write_manifest(manifest, [(_uri(k), lab, "") for k, (lab, _) in sorted(good.items())])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(sources.SourceError,
                       match=rf"manifest.csv: s3://{BUCKET}: S3 refused the credentials.*AWS_ACCESS_KEY_ID"):
        ingest.run(IngestConfig(source=str(manifest), s3_endpoint=aws_env.endpoint, workers=1),
                   _paths(tmp_path / "out"))


def test_manifest_with_s3_uris_missing_bucket(aws_env, tmp_path):
    manifest = tmp_path / "manifest.csv"
    _write_manifest(manifest, [("s3://no-such-bucket-keel/a/1.png", "cat", "")])
    with pytest.raises(sources.SourceError, match=r"s3://no-such-bucket-keel: bucket does not exist"):
        ingest.run(IngestConfig(source=str(manifest), s3_endpoint=aws_env.endpoint, workers=1),
                   _paths(tmp_path / "out"))


# ---------------------------------------------------------------- prefix layout: hidden and stray prefixes
def test_s3_hidden_prefixes_and_objects_are_never_classes_or_splits(aws_env, tmp_path):
    _upload(aws_env.client(), {"p4/train/a/1.png": _image(301, "PNG"), "p4/train/b/2.png": _image(302, "PNG"),
                               "p4/test/a/3.png": _image(303, "PNG"), "p4/test/b/4.png": _image(304, "PNG"),
                               "p4/.ipynb_checkpoints/a/5.png": _image(305, "PNG"),
                               "p4/train/a/.DS_Store": b"\x00\x01"})
    paths = _paths(tmp_path)
    result = ingest.run(IngestConfig(source=f"s3://{BUCKET}/p4", s3_endpoint=aws_env.endpoint, workers=1), paths)
    got = {r["source_uri"]: (r["source_split"], r["label"]) for r in _raw(paths).to_pylist()}
    assert got == {_uri("p4/train/a/1.png"): ("train", "a"), _uri("p4/train/b/2.png"): ("train", "b"),
                   _uri("p4/test/a/3.png"): ("test", "a"), _uri("p4/test/b/4.png"): ("test", "b")}
    (rej,) = _rejects(paths).to_pylist()
    assert (rej["source_uri"], rej["reason"]) == (_uri("p4/train/a/.DS_Store"), "hidden_file")
    assert "hidden object (name starts with '.')" in rej["detail"]
    assert result.found == result.ingested + result.rejected == 5


def test_s3_prefix_beside_split_prefixes_is_refused(aws_env, tmp_path):
    _upload(aws_env.client(), {"p5/train/a/1.png": _image(311, "PNG"), "p5/test/a/2.png": _image(312, "PNG"),
                               "p5/validation/a/3.png": _image(313, "PNG")})
    cfg = IngestConfig(source=f"s3://{BUCKET}/p5", s3_endpoint=aws_env.endpoint, workers=1)
    with pytest.raises(sources.SourceError) as info:
        ingest.run(cfg, _paths(tmp_path))
    assert str(info.value) == (
        f"s3://{BUCKET}/p5: found the split prefixes test/, train/ and beside them validation/; no other top-level "
        "prefix may exist beside train/, val/ or test/: rename it (e.g. validation/ -> val/) or move it out of the "
        "source")


def test_s3_class_prefixes_differing_in_case_are_refused(aws_env, tmp_path):
    _upload(aws_env.client(), {"p6/Cat/1.png": _image(321, "PNG"), "p6/cat/2.png": _image(322, "PNG")})
    cfg = IngestConfig(source=f"s3://{BUCKET}/p6", s3_endpoint=aws_env.endpoint, workers=1)
    with pytest.raises(sources.SourceError) as info:
        ingest.run(cfg, _paths(tmp_path))
    assert (f"would become separate classes: 'Cat' (prefix s3://{BUCKET}/p6/Cat/), "
            f"'cat' (prefix s3://{BUCKET}/p6/cat/). Merge them") in str(info.value)


# ---------------------------------------------------------------- a server gone between listing and fetching
@pytest.mark.reliability
def test_s3_server_gone_during_fetch_fails_the_stage_without_output(aws_env, tmp_path, monkeypatch, no_retry_sleep,
                                                                    record):
    """The listing succeeds, then the server dies: every fetch is refused.  That is the flow's retry to make (the
    message reads as transient), never read_error rejects on a "successful", smaller dataset."""
    import os
    import signal
    import time

    from tasks.core.retry import transient_text

    monkeypatch.setattr(sources, "FETCH", {"retries": 1, "connect_timeout": 1, "read_timeout": 5})
    with seaweed_s3() as server:  # its own server: this test kills it
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        _upload(client, {f"gone/{c}/{i}.png": _image(400 + 10 * k + i, "PNG")
                         for k, c in enumerate(CLASSES) for i in range(2)})
        real = sources.candidates

        def list_then_kill(*args, **kwargs):
            out = real(*args, **kwargs)
            os.killpg(server.pid, signal.SIGKILL)  # the group seaweed_s3 started (start_new_session)
            host, port = server.endpoint.rsplit("/", 1)[1].split(":")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until a connection to it is refused
                try:
                    socket.create_connection((host, int(port)), timeout=0.5).close()
                except OSError:
                    break
                time.sleep(0.05)
            return out

        monkeypatch.setattr(sources, "candidates", list_then_kill)
        paths = _paths(tmp_path)
        cfg = IngestConfig(source=f"s3://{BUCKET}/gone", s3_endpoint=server.endpoint, workers=1)
        with pytest.raises(sources.SourceError) as info:
            ingest.run(cfg, paths)
    msg = str(info.value)
    assert msg.startswith(f"s3://{BUCKET}/gone/") and " transient S3 error EndpointConnectionError at " \
        f"{server.endpoint} after 1 retries (could not connect)" in msg, msg
    assert "run the stage again (the flow retries it by itself)" in msg
    assert transient_text(msg)
    raw = tmp_path / "raw" / "items"
    assert not raw.exists() and not list(raw.parent.glob(".items.*"))  # no raw table, not even a temporary one
    assert not (tmp_path / "raw" / "rejects.parquet").exists()  # so no read_error rejects either
    record("outage", case="S3 server killed between listing and fetch (ingest)", ok=True,
           outcome=msg.split(" (could not connect)")[0].split(": ", 1)[1][:120] + "; no raw table, no rejects")
