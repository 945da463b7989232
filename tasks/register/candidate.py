"""The candidate's inputs: ``models/best.pt``, the evaluate and train metrics (consistency-checked), the lineage
tags it is registered with, and a couple of real images for the model's input example."""
from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

from tasks.core import checkpoint, io, lineage
from tasks.core.config import Paths, RegisterConfig
from tasks.core.errors import DataError
from tasks.core.lineage import model_sha256  # the one definition of a model's identity (shared with evaluate)
from tasks.register.records import TAG, TEST_METRIC_KEYS, Candidate, RegisterError, is_number, short


def load_candidate(paths: Paths) -> Candidate:

    best = Path(paths.models_dir) / "best.pt"
    if not best.is_file():
        raise RegisterError(f"{best}: no checkpoint; run `keel train` (dvc repro train) first")
    try:
        blob = checkpoint.load(best, what="best checkpoint")
    except checkpoint.UnsafeCheckpointError as exc:
        raise RegisterError(str(exc)) from None
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # corrupt / foreign file
        raise RegisterError(f"{best}: unreadable checkpoint ({type(exc).__name__}: {exc}); re-run `keel train`") \
            from None
    missing = [k for k in ("model", "model_name", "index") if k not in blob]
    if missing:
        raise RegisterError(f"{best}: not a keel best checkpoint (missing {missing}); re-run `keel train`")
    test = read_json(Path(paths.test_metrics), "keel evaluate")
    absent = [k for k in TEST_METRIC_KEYS if k not in test]
    if absent:
        raise RegisterError(f"{paths.test_metrics}: missing {absent}; re-run `keel evaluate`")
    train = read_json(Path(paths.train_metrics), "keel train")
    if not is_number(train.get("best_val_accuracy")):
        raise RegisterError(f"{paths.train_metrics}: no best_val_accuracy; re-run `keel train`")
    sha = model_sha256(blob["model"], blob["model_name"])
    if test["model_sha256"] != sha:
        raise RegisterError(
            f"{paths.test_metrics} belongs to another model: its model_sha256 is {short(test['model_sha256'])}, "
            f"{best} is {short(sha)}. The test metrics must be of this checkpoint: run `keel evaluate` "
            f"(dvc repro evaluate) after training, then register.")
    return Candidate(blob, sha, test, train, str(test["manifest_sha256"]))


def read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise RegisterError(f"{path}: not found; run `{stage}` first")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise RegisterError(f"{path}: not valid JSON ({exc}); re-run `{stage}`") from None
    if not isinstance(data, dict):
        raise RegisterError(f"{path}: expected a JSON object; re-run `{stage}`")
    return data


def lineage_tags(cfg: RegisterConfig, paths: Paths, cand: Candidate) -> dict[str, str]:
    info = cand.blob.get("run_info") or {}
    git = {"git_sha": info["git_sha"], "git_dirty": info.get("git_dirty")} if info.get("git_sha") \
        else lineage.git_state()  # the code that trained the weights; the checkout's when best.pt lacks it
    test = cand.test
    looks = test.get("test_looks")
    tags = {
        "git_sha": git["git_sha"],
        "git_dirty": git["git_dirty"],
        "environment_hash": lineage.environment_hash(),
        "dvc_lock_sha256": _sha_or_absent(Path.cwd() / "dvc.lock"),
        "manifest_sha256": cand.manifest_sha256,
        "shard_index_sha256": _sha_or_absent(Path(paths.shards_dir) / "index.json"),
        "ge_validation": _ge_status(Path(paths.validate_dir) / "summary.json"),
        "params_sha256": _sha_or_absent(Path.cwd() / "params.yaml"),
        "training_run_id": info.get("tracking_run_id") or "none",
        "model_sha256": cand.model_sha256,
        "test_ledger": f"test set reused, {looks} looks" if test["test_reused"] else "first look",
        "test_accuracy": repr(float(test["test_accuracy"])),
        "test_macro_f1": repr(float(test["test_macro_f1"])),
        "val_accuracy": repr(float(cand.train["best_val_accuracy"])),
        "model_name": cand.blob["model_name"],
        "test_accuracy_dedup": _audit_tag(test, "test_accuracy_dedup", float),
        "feature_dup_count": _audit_tag(test, "feature_dup_count", int),
    }
    return {f"{TAG}{k}": str(v) for k, v in tags.items()}


def _audit_tag(test: dict, key: str, kind) -> str:
    """A feature-space audit number as a tag; without one, why (test.json's ``feature_audit``), never a blank."""
    v = test.get(key)
    if is_number(v):
        return repr(kind(v))
    return f"none: feature audit {test.get('feature_audit') or 'off'}"


def _sha_or_absent(path: Path) -> str:
    return io.sha256_file(path) if path.is_file() else "absent"


def _ge_status(summary: Path) -> str:
    if not summary.is_file():
        return "absent"
    try:
        return "passed" if json.loads(summary.read_text()).get("success") else "failed"
    except (ValueError, AttributeError):
        return "failed"


def example_images(paths: Paths, n: int = 2, max_bytes: int = 256_000) -> list[bytes]:
    """A couple of real encoded images for the model's input example: original bytes of train items (never test);
    else train shard pixels as PNG; else a plain grey PNG at the model resolution."""
    import numpy as np

    from tasks import serving

    with contextlib.suppress(DataError, OSError, KeyError):
        found = _train_item_bytes(paths, n, max_bytes)
        if len(found) == n:
            return found
    with contextlib.suppress(DataError, OSError, KeyError):
        x, _, _ = next(io.ShardReader(paths.shards_dir, "train").iter_batches(batch_rows=n))
        if len(x):
            return [serving.encode_png(p) for p in x[:n]]
    return [serving.encode_png(np.full((32, 32), 128, np.uint8))]


def _train_item_bytes(paths: Paths, n: int, max_bytes: int) -> list[bytes]:
    """Up to ``n`` original encoded images of train items (at most ``max_bytes`` each), in raw-items order."""
    manifest, _ = io.read_manifest(paths.split_manifest)
    train = {i for i, s in zip(manifest.column("id").to_pylist(), manifest.column("split").to_pylist(),
                               strict=True) if s == "train"}
    found: list[bytes] = []
    for batch in io.iter_raw_batches(paths.raw_items, columns=["id", "image"], batch_rows=256):
        for i, b in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(), strict=True):
            if i in train and len(b) <= max_bytes:
                found.append(b)
                if len(found) == n:
                    return found
    return found
