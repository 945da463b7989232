"""The test-access ledger: an append-only JSONL record of every decision to read (or not) the sealed test split,
and the recorded results a ``read`` entry vouches for (see the package docstring for the entry fields).

It lives at ``paths.test_ledger`` and is deliberately not a DVC output: DVC deletes a stage's outputs before it
runs, and this record must outlive every run."""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import io
from tasks.evaluate.errors import EvaluateError


class Ledger:
    """The append-only test-access record of one project (see the package docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / "ledger.jsonl"
        self.results = self.root / "results"

    @contextlib.contextmanager
    def locked(self) -> Iterator[Ledger]:
        """Hold an exclusive ``flock`` on ``ledger.lock`` from a decision until its entry is written, so two
        concurrent evaluations cannot both take "the first look"."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "ledger.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                raise EvaluateError(f"{self.path}:{n}: unreadable ledger entry; the test-access record is damaged "
                                    "(inspect it, restore it from a backup; never delete it to get another look)"
                                    ) from None
        return out

    def append(self, entry: dict) -> None:
        line = (json.dumps(entry, sort_keys=False, default=io.json_default) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write on an O_APPEND descriptor: the line lands whole
            os.fsync(fd)
        finally:
            os.close(fd)

    def result_paths(self, sha: str) -> tuple[Path, Path]:
        return self.results / f"{sha}.json", self.results / f"{sha}.predictions.parquet"

    def record(self, result: dict, pred_table: pa.Table) -> tuple[str, str]:
        """Write a read's result files (before its ``read`` entry, so every entry has a result to return); their
        sha256s, for the entry."""
        res_path, pred_path = self.result_paths(result["model_sha256"])
        io.write_table(pred_path, pred_table)
        io.write_json(res_path, result)
        return io.sha256_file(res_path), io.sha256_file(pred_path)

    def load_recorded(self, entry: dict) -> tuple[dict, pa.Table] | None:
        """The result and predictions a ``read`` entry names, or None when either is missing or no longer matches
        the entry's checksums (then the model is scored again)."""
        res_path, pred_path = self.result_paths(entry["model_sha256"])
        try:
            if io.sha256_file(res_path) != entry.get("result_sha256") or \
                    io.sha256_file(pred_path) != entry.get("predictions_sha256"):
                return None
            result = json.loads(res_path.read_text())
            if result.get("model_sha256") != entry["model_sha256"] or \
                    result.get("manifest_sha256") != entry["manifest_sha256"]:
                return None
            return result, pq.read_table(pred_path)
        except (OSError, ValueError, pa.ArrowInvalid):
            return None


def readers(entries: list[dict], manifest_sha: str) -> dict[str, dict]:
    """model_sha256 -> its first ``read`` entry, for the models that read this manifest's test split (in order)."""
    out: dict[str, dict] = {}
    for e in entries:
        if e.get("action") == "read" and e.get("manifest_sha256") == manifest_sha:
            out.setdefault(e["model_sha256"], e)
    return out


def latest_read(entries: list[dict], model_sha: str, manifest_sha: str) -> dict | None:
    """The newest ``read`` entry of one model on one manifest (it names the result file's current checksum)."""
    hits = [e for e in entries if e.get("action") == "read" and e.get("model_sha256") == model_sha
            and e.get("manifest_sha256") == manifest_sha]
    return hits[-1] if hits else None
