"""What the register stage tells people: ``paths.register_report`` (register.json), the printed gate table, and
the model version's description (how to serve ``models:/<name>@champion``)."""
from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from tasks.core import io
from tasks.core.config import Paths
from tasks.core.secrets import redact_uri
from tasks.core.text import fmt
from tasks.register.records import CHAMPION, SERVE_PORT, TAG, Candidate, Champion, RegisterResult, short


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def serve_command(name: str) -> str:
    return f"mlflow models serve -m {champion_uri(name)} --env-manager local -p {SERVE_PORT}"


def description(name: str, uri: str, cand: Candidate, tags: dict) -> str:
    classes = cand.blob["index"]["classes"]
    return (f"keel image classifier ({cand.blob['model_name']}, {len(classes)} classes), test accuracy "
            f"{float(cand.test['test_accuracy']):.4f}, macro F1 {float(cand.test['test_macro_f1']):.4f} "
            f"({tags[f'{TAG}test_ledger']}); {_dedup_words(cand.test)}; lineage in the keel.* tags.\n\n"
            f"Serve: `MLFLOW_TRACKING_URI={redact_uri(uri)} {serve_command(name)}`\n\n"
            "Request: POST /invocations, Content-Type: application/json, "
            '`{"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG/JPEG file>"]]}}` '
            "(one row per image). Answer: label, label_index, probability, probabilities (in class order). "
            "In Python: `mlflow.pyfunc.load_model(\"" + champion_uri(name) + "\").predict(pd.DataFrame("
            "{\"image\": [png_bytes]}))`. A bad image gets HTTP 400 naming the row and the reason.")


def _dedup_words(test: dict) -> str:
    acc, count = test.get("test_accuracy_dedup"), test.get("feature_dup_count")
    if acc is None or count is None:
        return f"feature-space audit {test.get('feature_audit') or 'off'}"
    return (f"test accuracy {float(acc):.4f} without the {int(count)} test item(s) that are near-duplicates of "
            "train items in the model's feature space")


def write_report(paths: Paths, result: RegisterResult, cand: Candidate, champion: Champion | None,
                 uri: str) -> None:
    report = {
        "status": result.status,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_name": result.model_name,
        "version": result.version,
        "aliases": result.aliases,
        "model_uri": result.model_uri,
        "version_uri": f"models:/{result.model_name}/{result.version}" if result.version else None,
        "tracking_uri": redact_uri(uri),
        "run_id": result.run_id,
        "candidate": {"model_sha256": cand.model_sha256, "manifest_sha256": cand.manifest_sha256,
                      "model": cand.blob["model_name"],
                      **{k: cand.test.get(k) for k in ("test_accuracy", "test_macro_f1", "test_looks",
                                                       "test_reused", "test_accuracy_dedup", "feature_dup_count")},
                      "val_accuracy": cand.train.get("best_val_accuracy")},
        "gate": {"passed": all(c.passed for c in result.checks), "checks": [asdict(c) for c in result.checks]},
        "champion_before": asdict(champion) if champion else None,
        "tags": result.tags,
        "tag_drift": result.tag_drift,
        # the model is logged as code (tasks/serving/model_code.py): serving can refuse every pickle
        "serve": {"command": serve_command(result.model_name),
                  "env": {"MLFLOW_TRACKING_URI": redact_uri(uri), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
                  "request": {"method": "POST", "path": "/invocations", "content_type": "application/json",
                              "body": {"dataframe_split": {"columns": ["image"],
                                                           "data": [["<base64 of an encoded image>"]]}}}},
    }
    io.write_json(paths.register_report, report)


def print_result(result: RegisterResult, cand: Candidate, champion: Champion | None) -> None:
    lines = [(f"register: gate for {result.model_name} (model {short(cand.model_sha256)}, test split "
              f"{short(cand.manifest_sha256)})")]
    if champion is not None:
        lines.append(f"  current @champion: version {champion.version} ({champion.metric} "
                     f"{_cell(champion.value)}, test split {short(champion.manifest_sha256)})")
    lines.append(f"  {'check':<16} {'value':>10} {'threshold':>11}  result  detail")
    for c in result.checks:
        lines.append(f"  {c.name:<16} {_cell(c.value):>10} {_cell(c.threshold, '>= '):>11}  "
                     f"{'pass' if c.passed else 'FAIL':<6}  {c.detail}")
    if result.status == "gate_failed":
        failed = ", ".join(c.name for c in result.checks if not c.passed)
        lines.append(f"register: gate failed ({failed}); the registry is unchanged. Report: {result.report_path}")
    else:
        verb = "registered" if result.status == "registered" else "already registered as"
        lines += [(f"register: {verb} {result.model_name} version {result.version} "
                   f"(aliases: {', '.join('@' + a for a in result.aliases) or 'none'})"),
                  f"  report: {result.report_path}",
                  (f"  serve:  MLFLOW_TRACKING_URI={redact_uri(result.tracking_uri)} "
                   f"MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false {serve_command(result.model_name)}")]
    print("\n".join(lines))


def _cell(v: Any, prefix: str = "") -> str:
    """A table cell (``tasks.core.text.fmt``); ``prefix`` goes before a number, never before "-" or a bool."""
    return fmt(v) if v is None or isinstance(v, bool) else prefix + fmt(v)
