"""ingest's guarantees on sources that used to pass with wrong labels or a silently smaller dataset: layouts with a
stray or hidden folder, manifest labels that type inference changed, one class, the same bytes under two labels,
labels that differ only in case, an unbalanced account, an empty source, and S3 fetches that fail for a passing
reason (a fake client here; the real server in test_ingest_s3.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest
from tasks.core.config import IngestConfig
from tasks.core.io import DataError, read_raw_meta
from tasks.core.retry import transient_text
from tasks.ingest import sources
from tasks.ingest.sources import SourceError
from tests.conftest import encode, pattern


def _tables(paths):
    meta = read_raw_meta(paths.raw_items).to_pylist()
    rejects = pq.read_table(paths.rejects).to_pylist()
    return {r["source_uri"]: r for r in meta}, {r["source_uri"]: r for r in rejects}


def _tree(root: Path, files: dict[str, bytes | int]) -> Path:
    """Files under ``root``: a value is the bytes, or a seed for a distinct small PNG."""
    for rel, content in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(encode(pattern(content)) if isinstance(content, int) else content)
    return root


def _no_raw_table(paths) -> bool:
    raw = Path(paths.raw_items)
    return not raw.exists() and not list(raw.parent.glob(f".{raw.name}.*"))  # nor a temporary one left behind


# ---------------------------------------------------------------- 1. folder layout
def test_hidden_folders_and_files_are_never_classes_or_splits(tmp_path, paths):
    root = _tree(tmp_path / "src", {"train/a/1.png": 1, "train/b/2.png": 2, "test/a/3.png": 3, "test/b/4.png": 4,
                                    ".ipynb_checkpoints/a/5.png": 5, "train/.cache/b/6.png": 6,
                                    "train/a/.DS_Store": b"\x00\x01", "loose.png": 7})
    (root / ".git").mkdir()
    r = ingest.run(IngestConfig(source=str(root), workers=1), paths)
    items, rejects = _tables(paths)
    assert {u: (i["source_split"], i["label"]) for u, i in items.items()} == {
        "train/a/1.png": ("train", "a"), "train/b/2.png": ("train", "b"),
        "test/a/3.png": ("test", "a"), "test/b/4.png": ("test", "b")}
    assert {u: x["reason"] for u, x in rejects.items()} == {"train/a/.DS_Store": "hidden_file",
                                                            "loose.png": "missing_label"}
    assert "train/a/.DS_Store: hidden file (name starts with '.')" in rejects["train/a/.DS_Store"]["detail"]
    assert "under train/ val/ or test/" in rejects["loose.png"]["detail"]
    assert r.found == r.ingested + r.rejected == 6 and r.reject_counts == {"hidden_file": 1, "missing_label": 1}


@pytest.mark.parametrize("stray", ["validation", "extra"])
def test_folder_beside_split_folders_is_refused(tmp_path, paths, stray):
    root = _tree(tmp_path / "src", {"train/a/1.png": 1, "train/b/2.png": 2, "test/a/3.png": 3,
                                    f"{stray}/a/4.png": 4})
    with pytest.raises(SourceError) as info:
        ingest.run(IngestConfig(source=str(root), workers=1), paths)
    assert str(info.value) == (
        f"{root}: found the split folders test/, train/ and beside them {stray}/; no other top-level folder may "
        "exist beside train/, val/ or test/: rename it (e.g. validation/ -> val/) or move it out of the source")
    assert _no_raw_table(paths)


def test_empty_stray_folder_beside_split_folders_is_refused(tmp_path, paths):
    root = _tree(tmp_path / "src", {"train/a/1.png": 1, "test/b/2.png": 2})
    (root / "checkpoints").mkdir()
    with pytest.raises(SourceError, match=r"found the split folders test/, train/ and beside them checkpoints/; "):
        ingest.run(IngestConfig(source=str(root), workers=1), paths)


# ---------------------------------------------------------------- 2. manifest labels stay text
def _images(root: Path, n: int) -> list[str]:
    _tree(root, {f"imgs/{k}.png": 100 + k for k in range(n)})
    return [f"imgs/{k}.png" for k in range(n)]


def test_csv_manifest_labels_are_read_as_text(tmp_path, paths):
    root = tmp_path / "root"
    files = _images(root, 7)
    labels = ["001", "1", "0", "", "true", "NA", "007"]
    (root / "m.csv").write_text("path,label,group\n" + "".join(
        f"{f},{lab},{'007' if k == 0 else ''}\n" for k, (f, lab) in enumerate(zip(files, labels))))
    r = ingest.run(IngestConfig(source=str(root / "m.csv"), workers=1), paths)
    items, rejects = _tables(paths)
    assert {u: i["label"] for u, i in items.items()} == {
        "imgs/0.png": "001", "imgs/1.png": "1", "imgs/2.png": "0", "imgs/4.png": "true", "imgs/5.png": "NA",
        "imgs/6.png": "007"}
    assert items["imgs/0.png"]["group"] == "007"
    assert rejects["imgs/3.png"]["reason"] == "missing_label"
    assert "m.csv row 5: the label cell is empty" in rejects["imgs/3.png"]["detail"]
    assert r.found == 7


@pytest.mark.parametrize("values,type_name", [([1.0, 2.0], "double"), ([True, False], "bool")])
def test_parquet_manifest_label_that_is_not_text_or_integer_is_refused(tmp_path, paths, values, type_name):
    root = tmp_path / "root"
    files = _images(root, 2)
    pq.write_table(pa.table({"path": files, "label": values}), root / "m.parquet")
    with pytest.raises(SourceError) as info:
        ingest.run(IngestConfig(source=str(root / "m.parquet"), workers=1), paths)
    assert str(info.value).startswith(f"{root / 'm.parquet'}: column 'label' has type {type_name}; labels must be "
                                      "strings or integers")
    assert "write the column as strings" in str(info.value)


def test_parquet_manifest_dictionary_labels_are_text(tmp_path, paths):
    root = tmp_path / "root"
    files = _images(root, 2)
    labels = pa.array(["x", "y"]).dictionary_encode()  # what a pandas categorical column writes
    pq.write_table(pa.table({"path": files, "label": labels}), root / "m.parquet")
    ingest.run(IngestConfig(source=str(root / "m.parquet"), workers=1), paths)
    items, _ = _tables(paths)
    assert {i["label"] for i in items.values()} == {"x", "y"}


# ---------------------------------------------------------------- 3. at least two classes
def test_one_class_fails_naming_the_label(tmp_path, paths):
    root = _tree(tmp_path / "src", {"cat/1.png": 1, "cat/2.png": 2, "cat/empty.png": b""})
    with pytest.raises(DataError) as info:
        ingest.run(IngestConfig(source=str(root), workers=1), paths)
    assert str(info.value).startswith(f"ingest: only one class: all 2 ingested items from {root} have label 'cat'; "
                                      "a classifier needs at least two classes. Add items of another class")
    assert paths.rejects in str(info.value)
    assert [r["reason"] for r in pq.read_table(paths.rejects).to_pylist()] == ["empty_file"]
    assert _no_raw_table(paths)


def test_one_class_left_after_unknown_labels_fails(tmp_path, paths):
    root = _tree(tmp_path / "src", {"cat/1.png": 1, "dog/2.png": 2})
    with pytest.raises(DataError, match=r"only one class: all 1 ingested items .* have label 'cat'.*ingest\.classes"):
        ingest.run(IngestConfig(source=str(root), classes=["cat"], workers=1), paths)


# ---------------------------------------------------------------- 4. the same bytes under two labels
def test_byte_identical_copies_with_different_labels_are_all_rejected(tmp_path, paths):
    same = encode(pattern(42))
    twin = encode(pattern(43))
    root = _tree(tmp_path / "src", {"cat/a.png": same, "cat/b.png": same, "dog/c.png": same,
                                    "cat/t1.png": twin, "cat/t2.png": twin,
                                    **{f"{('cat', 'dog')[k % 2]}/x{k}.png": 50 + k for k in range(6)}})
    # one row per part: the copy ingested first is already in a written part when the conflict shows
    r = ingest.run(IngestConfig(source=str(root), workers=1, part_rows=1), paths)
    items, rejects = _tables(paths)
    conflict_id = ingest.hashlib.sha256(same).hexdigest()
    assert conflict_id not in {i["id"] for i in items.values()}
    for uri in ("cat/a.png", "cat/b.png", "dog/c.png"):
        rej = rejects[uri]
        assert rej["reason"] == "conflicting_labels" and rej["duplicate_of"] is None
        assert rej["detail"].startswith(f"byte-identical copies (id {conflict_id[:16]}…) carry different labels: ")
        for other, label in (("cat/a.png", "cat"), ("cat/b.png", "cat"), ("dog/c.png", "dog")):
            assert f"{other} (label {label!r})" in rej["detail"]
        assert "none was ingested: correct the wrong label(s), or delete the wrong copy" in rej["detail"]
    # same-label copies stay one item and a duplicate_bytes reject
    (dup,) = [u for u in ("cat/t1.png", "cat/t2.png") if u in rejects]
    assert rejects[dup]["reason"] == "duplicate_bytes"
    assert r.reject_counts == {"conflicting_labels": 3, "duplicate_bytes": 1}
    assert r.found == r.ingested + r.rejected == 11 and r.ingested == 7 == len(items)
    assert len(pq.read_table(paths.raw_items)) == 7  # every part, the image column included


def test_manifest_row_repeated_with_another_label_is_rejected(tmp_path, paths):
    root = tmp_path / "root"
    files = _images(root, 3)
    (root / "m.csv").write_text(f"path,label\n{files[0]},cat\n{files[1]},cat\n{files[2]},dog\n{files[0]},dog\n")
    r = ingest.run(IngestConfig(source=str(root / "m.csv"), workers=1), paths)
    meta = read_raw_meta(paths.raw_items).to_pylist()
    rejects = pq.read_table(paths.rejects).to_pylist()
    assert sorted(i["source_uri"] for i in meta) == files[1:]
    assert [r["reason"] for r in rejects] == ["conflicting_labels"] * 2
    assert r.found == 4 and r.ingested == 2 and r.rejected == 2


# ---------------------------------------------------------------- 5. labels equal but for case or spacing
def test_class_folders_differing_in_case_are_refused(tmp_path, paths):
    root = _tree(tmp_path / "src", {"Cat/1.png": 1, "cat/2.png": 2, "cat/3.png": 3, "dog/4.png": 4})
    with pytest.raises(SourceError) as info:
        ingest.run(IngestConfig(source=str(root), workers=1), paths)
    assert str(info.value) == (
        "ingest.source: labels that differ only in case or spacing would become separate classes: "
        "'Cat' (folder Cat/), 'cat' (folder cat/). Merge them into one class (one folder, or one spelling in the "
        "manifest) or rename one so that the names really differ")
    assert _no_raw_table(paths)


def test_manifest_labels_differing_in_case_or_spacing_are_refused(tmp_path, paths):
    root = tmp_path / "root"
    files = _images(root, 5)
    (root / "m.csv").write_text("path,label\n" + "".join(
        f"{f},{lab}\n" for f, lab in zip(files, ["big cat", "Big  Cat", "dog", "DOG", "dog"])))
    with pytest.raises(SourceError) as info:
        ingest.run(IngestConfig(source=str(root / "m.csv"), workers=1), paths)
    msg = str(info.value)
    assert "'Big  Cat' (m.csv row 3), 'big cat' (m.csv row 2)" in msg
    assert "'DOG' (m.csv row 5), 'dog' (m.csv row 4, m.csv row 6)" in msg
    assert "Merge them into one class" in msg


def test_labels_are_stripped_of_surrounding_spaces(tmp_path, paths):
    root = tmp_path / "root"
    files = _images(root, 3)
    (root / "m.csv").write_text(f"path,label\n{files[0]}, cat \n{files[1]},cat\n{files[2]},dog\t\n")
    ingest.run(IngestConfig(source=str(root / "m.csv"), workers=1), paths)
    assert sorted(i["label"] for i in read_raw_meta(paths.raw_items).to_pylist()) == ["cat", "cat", "dog"]
    folder = _tree(tmp_path / "src", {"cat /1.png": 1, "dog/2.png": 2})
    ingest.run(IngestConfig(source=str(folder), workers=1), paths)
    items, _ = _tables(paths)
    assert items["cat /1.png"]["label"] == "cat"


# ---------------------------------------------------------------- 6. the account is checked, not asserted
def test_a_lost_result_is_an_internal_error(tmp_path, paths, monkeypatch):
    root = _tree(tmp_path / "src", {"cat/1.png": 1, "cat/2.png": 2, "dog/3.png": 3, "dog/4.png": 4, "dog/5.png": 5})
    real = ingest._process_chunk
    monkeypatch.setattr(ingest, "_process_chunk", lambda chunk: real(chunk)[:-1])  # one result goes missing
    with pytest.raises(RuntimeError) as info:
        ingest.run(IngestConfig(source=str(root), workers=1), paths)
    assert str(info.value).startswith("ingest: internal error: the account does not balance: found 5 != ingested "
                                      "4 + rejected 0")
    assert _no_raw_table(paths)


# ---------------------------------------------------------------- 7. an empty source
@pytest.mark.parametrize("files", [{}, {".DS_Store": b"x", ".ipynb_checkpoints/a/1.png": 1}],
                         ids=["empty folder", "only hidden files"])
def test_empty_folder_says_no_files_found(tmp_path, paths, files):
    root = _tree(tmp_path / "src", files)
    root.mkdir(exist_ok=True)
    with pytest.raises(SourceError) as info:
        ingest.run(IngestConfig(source=str(root), workers=1), paths)
    assert str(info.value) == (f"ingest.source: no files found in {root} (hidden files and folders (names starting "
                               "with '.') are skipped; expected <class>/<file> or <split>/<class>/<file>)")


def test_empty_manifest_says_no_files_found(tmp_path, paths):
    (tmp_path / "m.csv").write_text("path,label\n")
    with pytest.raises(SourceError, match=r"no files found in .*m\.csv \(the manifest has no rows\)"):
        ingest.run(IngestConfig(source=str(tmp_path / "m.csv"), workers=1), paths)


# ---------------------------------------------------------------- 8. S3 fetch errors: transient fails, permanent rejects
class _FakeS3:
    """get_object raises ``exc`` for every key in ``failing``; other keys are read from ``objects``."""

    def __init__(self, objects: dict[str, bytes], failing: dict[str, Exception]):
        self.objects, self.failing = objects, failing
        self.meta = type("Meta", (), {"endpoint_url": "http://s3.test:9000"})()

    def get_object(self, Bucket, Key):  # boto3's spelling
        import io

        if Key in self.failing:
            raise self.failing[Key]
        return {"Body": io.BytesIO(self.objects[Key])}


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "test"},
                        "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 2}}, "GetObject")


def _fake_bucket(monkeypatch, failing: dict[str, Exception]) -> None:
    objects = {f"p/{c}/{k}.png": encode(pattern(200 + 10 * i + k)) for i, c in enumerate(("cat", "dog"))
               for k in range(3)}
    cands = [sources.Candidate(uri=f"s3://b/{key}", label=key.split("/")[1], s3=("b", key))
             for key in sorted(objects | failing)]
    monkeypatch.setattr(sources, "candidates", lambda *a, **k: list(cands))
    monkeypatch.setattr(sources, "s3_client", lambda *a, **k: _FakeS3(objects, failing))


def _transient_cases():
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    return [
        pytest.param(_client_error("SlowDown", 503), "SlowDown (HTTP 503)", id="SlowDown"),
        pytest.param(_client_error("ServiceUnavailable", 503), "ServiceUnavailable (HTTP 503)", id="503"),
        pytest.param(_client_error("RequestTimeout", 400), "RequestTimeout (HTTP 400)", id="RequestTimeout"),
        pytest.param(_client_error("InternalError", 500), "InternalError (HTTP 500)", id="InternalError"),
        pytest.param(_client_error("ExpiredToken", 400), "ExpiredToken (HTTP 400)", id="ExpiredToken"),
        pytest.param(EndpointConnectionError(endpoint_url="http://s3.test:9000/b/p"), "EndpointConnectionError",
                     id="EndpointConnectionError"),
        pytest.param(ConnectionClosedError(endpoint_url="http://s3.test:9000/b/p"), "ConnectionClosedError",
                     id="ConnectionClosedError"),
        pytest.param(ReadTimeoutError(endpoint_url="http://s3.test:9000/b/p"), "ReadTimeoutError",
                     id="ReadTimeoutError"),
    ]


@pytest.mark.parametrize("exc,code", _transient_cases())
def test_transient_s3_fetch_error_fails_the_stage(tmp_path, paths, monkeypatch, exc, code):
    _fake_bucket(monkeypatch, {"p/cat/9.png": exc})
    with pytest.raises(SourceError) as info:
        ingest.run(IngestConfig(source="s3://b/p", workers=1), paths)
    msg = str(info.value)
    assert msg.startswith(f"s3://b/p/cat/9.png: transient S3 error {code} at http://s3.test:9000 after ")
    assert "wrote no raw items rather than drop the object; run the stage again" in msg
    assert transient_text(msg), msg  # the flow's retry classifier sees a transient failure
    assert _no_raw_table(paths) and not Path(paths.rejects).exists()  # no read_error reject, no partial table


@pytest.mark.parametrize("exc,reason", [(_client_error("NoSuchKey", 404), "missing_file"),
                                        (_client_error("AccessDenied", 403), "read_error")],
                         ids=["NoSuchKey", "AccessDenied"])
def test_permanent_s3_fetch_error_is_a_reject(tmp_path, paths, monkeypatch, exc, reason):
    _fake_bucket(monkeypatch, {"p/cat/9.png": exc})
    r = ingest.run(IngestConfig(source="s3://b/p", workers=1), paths)
    _, rejects = _tables(paths)
    assert r.ingested == 6 and rejects["s3://b/p/cat/9.png"]["reason"] == reason
    assert exc.response["Error"]["Code"] in rejects["s3://b/p/cat/9.png"]["detail"]


def test_unreadable_local_file_is_a_reject(tmp_path, paths):
    root = _tree(tmp_path / "src", {"cat/1.png": 1, "dog/2.png": 2})
    os.symlink(root / "dog" / "deleted.png", root / "dog" / "3.png")  # dangling: listed, then cannot be opened
    r = ingest.run(IngestConfig(source=str(root), workers=1), paths)
    _, rejects = _tables(paths)
    assert r.ingested == 2 and rejects["dog/3.png"]["reason"] == "read_error"
    assert "FileNotFoundError" in rejects["dog/3.png"]["detail"]


def test_a_failure_mid_audit_leaves_no_audit_folder(tmp_path, paths, monkeypatch):
    """The audit folder is built under a temporary name: a crash (or kill) half-way leaves none at its name."""
    from tasks.ingest import audit

    root = _tree(tmp_path / "src", {"cat/1.png": 1, "dog/2.png": 2})

    def boom(*a, **k):
        raise RuntimeError("killed while drawing the contact sheet")

    monkeypatch.setattr(audit, "_contact_sheet", boom)
    with pytest.raises(RuntimeError, match="contact sheet"):
        ingest.run(IngestConfig(source=str(root), workers=1), paths)
    audit_dir = Path(paths.audit_dir)
    assert not audit_dir.exists() and not list(audit_dir.parent.glob(f".{audit_dir.name}.*"))
