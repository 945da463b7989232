"""The evaluate stage: check and rebuild best.pt, take the access decision under the ledger lock, read the test
split only when the decision allows it, then render every output from the (new or recorded) result."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from tasks.core import io, lineage, progress, runtime
from tasks.core.config import EvaluateConfig, Paths
from tasks.core.lineage import model_sha256
from tasks.core.project import at_home, experiment_refusal
from tasks.evaluate import decide, feature_audit, report
from tasks.evaluate.checkpoint import build, check_data, load_checkpoint
from tasks.evaluate.errors import EvaluateError, SecondLookRefused
from tasks.evaluate.ledger import Ledger, latest_read, readers
from tasks.evaluate.metrics import compute_metrics, predict, predictions_table


@dataclass
class EvaluateResult:
    decision: str  # "read" | "recorded_result_returned"
    model_sha256: str
    model_name: str
    manifest_sha256: str
    accuracy: float
    macro_f1: float
    loss: float
    ece: float
    rows: int
    looks: int
    test_reused: bool
    reused_result: bool
    metrics: dict  # what paths.test_metrics holds
    accuracy_dedup: float | None = None  # on the test items the feature-space audit did not flag (None: audit off)
    feature_dup_count: int | None = None
    feature_audit: dict | None = None  # the audit's record (feature_duplicates.json)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry_base(cfg: EvaluateConfig, paths: Paths, ckpt: dict, ckpt_path: Path, sha: str, name: str,
                index: io.ShardIndex) -> dict:
    """The fields every ledger entry (and every recorded result) of this evaluation shares."""
    info = ckpt["run_info"]
    git = lineage.git_state()
    return {"model_sha256": sha, "model_name": name, "checkpoint": str(ckpt_path),
            "tracking_run_id": info.get("tracking_run_id"), "train_git_sha": info.get("git_sha"),
            "train_git_dirty": info.get("git_dirty"), "git_sha": git["git_sha"], "git_dirty": git["git_dirty"],
            "manifest_sha256": index.manifest_sha256,
            "shard_index_sha256": io.sha256_file(Path(paths.shards_dir) / "index.json"),
            "test_rows": index.rows("test"), "policy": cfg.second_look}


def _read(cfg: EvaluateConfig, paths: Paths, ledger: Ledger, prior: dict[str, dict], base: dict, ckpt: dict,
          model, device, space: dict | None) -> tuple[dict, pa.Table, str | None]:
    """Under the lock: refuse a strict second look, or score the model on the test shards (the feature-space
    audit's train side first, its test side in the same single pass), record the result, then append its ``read``
    entry. Returns the result, its predictions and the entry's note."""
    sha, name, manifest_sha = base["model_sha256"], base["model_name"], base["manifest_sha256"]
    look = decide.next_look(prior, sha)
    if look.refused(cfg.second_look):
        msg = decide.refusal_message(look, sha, name, manifest_sha, ledger.path)
        ledger.append({"time": _now(), "action": "refused", **base, "looks": len(prior),
                       "reason": decide.refusal_reason(look)})
        report.remove_stale_outputs(paths, sha)
        raise SecondLookRefused(msg)
    decide.warn(look, cfg.second_look, manifest_sha)
    pre = ckpt["index"]
    tta = ckpt["run_info"]["config"].get("tta", "none")
    train = (feature_audit.prepare(model, paths.shards_dir, pre["mean"], pre["std"], cfg.batch_size, device,
                                   cfg.feature_dup_quantile, space)
             if space is not None else feature_audit.disabled("evaluate.feature_audit is false"))
    search = train.search() if isinstance(train, feature_audit.TrainSide) else None
    reader = io.ShardReader(paths.shards_dir, "test", reader_of=io.TEST_READER)
    probs, labels, ids = predict(model, reader, pre["mean"], pre["std"], cfg.batch_size, device, tta,
                                 on_features=search)
    metrics = compute_metrics(probs, labels, list(pre["classes"]), cfg.calibration_bins)
    audit = (feature_audit.finish(train, search, ids, labels, probs, list(pre["classes"])) if search is not None
             else train)
    result = {**base, "time": _now(), "classes": list(pre["classes"]), "looks": look.number, "tta": tta,
              "test_reused": look.reused, "earlier_readers": list(look.others), "metrics": metrics,
              "feature_audit": audit}
    pred_table = predictions_table(ids, labels, probs)
    result_sha, predictions_sha = ledger.record(result, pred_table)
    headline = {k: v for k, v in report.headline(result, False).items()
                if k in ("test_accuracy", "test_macro_f1", "test_loss", "test_ece", "test_accuracy_dedup",
                         "feature_dup_count")}
    ledger.append({"time": result["time"], "action": "read", **base, "looks": look.number, "metrics": headline,
                   "test_reused": look.reused, "result_sha256": result_sha, "predictions_sha256": predictions_sha,
                   "note": look.note})
    return result, pred_table, look.note


def run(cfg: EvaluateConfig, paths: Paths) -> EvaluateResult:
    """Score best.pt on the sealed test split once per model; see the package docstring for the ledger contract."""
    t0 = time.monotonic()
    refusal = experiment_refusal("evaluate")
    if refusal:  # before anything is read: an experiment never touches the test split or the ledger
        raise EvaluateError(refusal)
    ckpt_path = Path(paths.models_dir) / "best.pt"
    index = io.ShardIndex.load(paths.shards_dir)
    ckpt = load_checkpoint(ckpt_path)
    check_data(ckpt, index, ckpt_path, paths.shards_dir)
    model, name = build(ckpt, ckpt_path)
    device = runtime.device(cfg.device, "evaluate.device")  # fail before any access decision
    space = (feature_audit.check_tap(model, int(ckpt["index"]["channels"]), int(ckpt["index"]["resolution"]), device)
             if cfg.feature_audit else None)  # likewise: a model the audit cannot tap fails here
    sha = model_sha256(ckpt["model"], name)
    manifest_sha = index.manifest_sha256
    if index.rows("test") == 0:
        raise EvaluateError(f"{paths.shards_dir}: the test split has no rows; nothing to evaluate "
                            "(check the split fractions and re-run `keel split`/`keel shard`)")
    base = _entry_base(cfg, paths, ckpt, ckpt_path, sha, name, index)
    ledger = Ledger(at_home(paths.test_ledger))  # the project's, also from an experiment's temporary copy
    with ledger.locked():
        entries = ledger.entries()
        prior = readers(entries, manifest_sha)
        last_read = latest_read(entries, sha, manifest_sha)
        recorded = ledger.load_recorded(last_read) if last_read else None
        if recorded is not None:
            result, pred_table = recorded
            decision, note = "recorded_result_returned", None
            ledger.append({"time": _now(), "action": decision, **base, "looks": len(prior),
                           "returned_read_time": result["time"]})
        else:
            result, pred_table, note = _read(cfg, paths, ledger, prior, base, ckpt, model, device, space)
            decision = "read"
    total_looks = len(readers(ledger.entries(), manifest_sha))
    if decision == "read":
        status = (f"Read the sealed test split (look #{result['looks']} on this split) at {result['time']}; "
                  f"recorded in `{ledger.path}`" + (f" ({note})" if note else "") + ".")
    else:
        status = (f"Recorded result returned: this model was scored at {result['time']}; the test shards were not "
                  f"opened again (`{ledger.path}`). Models scored on this split so far: {total_looks}.")
    headline = report.write_outputs(paths, result, pred_table, decision != "read", status)
    m = result["metrics"]
    if decision == "read":
        said = f"read, look #{result['looks']}" + (" (TEST SET REUSED)" if result["test_reused"] else "")
    else:
        said = "recorded result returned (test shards not opened)"
    print(f"evaluate: {name} {sha[:12]}… on {m['rows']} test items: accuracy {m['accuracy']:.4f}, macro F1 "
          f"{m['macro_f1']:.4f}, ECE {m['ece']:.4f}; ledger: {said} [{time.monotonic() - t0:.1f}s]", file=sys.stderr)
    audit = result.get("feature_audit") or feature_audit.NOT_RECORDED
    print(f"evaluate: {feature_audit.summary_line(audit)}{_recorded_audit_note(cfg, audit, decision)}", file=sys.stderr)
    progress.summary("evaluate", m["rows"], None, time.monotonic() - t0, unit="test items")
    return EvaluateResult(decision=decision, model_sha256=sha, model_name=name, manifest_sha256=manifest_sha,
                          accuracy=m["accuracy"], macro_f1=m["macro_f1"], loss=m["loss"], ece=m["ece"],
                          rows=m["rows"], looks=result["looks"], test_reused=result["test_reused"],
                          reused_result=decision != "read", metrics=headline,
                          accuracy_dedup=headline["test_accuracy_dedup"], feature_dup_count=headline["feature_dup_count"],
                          feature_audit=report.audit_record(audit))


def _recorded_audit_note(cfg: EvaluateConfig, audit: dict, decision: str) -> str:
    """A returned result keeps the audit of its one read; say so when today's settings would differ."""
    if decision == "read":
        return ""
    if audit.get("enabled") and (not cfg.feature_audit or audit["quantile"] != cfg.feature_dup_quantile):
        now = (f"evaluate.feature_dup_quantile is now {cfg.feature_dup_quantile:g}" if cfg.feature_audit
               else "evaluate.feature_audit is now false")
        return (f" (recorded with quantile {audit['quantile']:g} when this model was scored; {now}, but the test "
                "split is read once per model, so the recorded audit stands)")
    if not audit.get("enabled") and cfg.feature_audit:
        return " (evaluate.feature_audit is on now, but the test split is read once per model: the recorded result stands)"
    return ""
