"""The stage's outputs, all rendered from one recorded result (so a returned result reproduces them exactly):
``confusion.csv``, ``per_class.csv``, ``predictions.parquet``, ``confusion.png``, ``reliability.png``,
``feature_duplicates.json``, ``feature_duplicates.png``, ``summary.md`` under ``paths.evaluate_dir``, then
``paths.test_metrics`` (the headline) last. Every write is atomic."""
from __future__ import annotations

import csv
import io as _text_io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.core import io
from tasks.core.config import Paths
from tasks.core.text import pyplot, save_png
from tasks.evaluate import feature_audit

OUTPUT_FILES = ("confusion.png", "confusion.csv", "per_class.csv", "reliability.png", "predictions.parquet",
                "feature_duplicates.json", "feature_duplicates.png", "summary.md")


def headline(result: dict, reused_result: bool) -> dict:
    """What ``paths.test_metrics`` holds: the headline numbers and how they were obtained."""
    m = result["metrics"]
    return {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "test_loss": m["loss"],
            "test_ece": m["ece"], "test_rows": m["rows"], "test_looks": result["looks"],
            "test_reused": result["test_reused"], "model_sha256": result["model_sha256"],
            "manifest_sha256": result["manifest_sha256"], "reused_result": reused_result,
            **feature_audit.headline(result.get("feature_audit"))}


def audit_record(audit: dict | None) -> dict:
    """``feature_duplicates.json``: the recorded audit without the pictures' pixels (the PNG shows them)."""
    audit = audit or feature_audit.NOT_RECORDED
    out = {k: v for k, v in audit.items() if k != "pairs"}
    if audit.get("enabled"):
        out["picture"] = {"file": "feature_duplicates.png", "pairs": [p["id"] for p in audit.get("pairs", [])]}
    return out


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = _text_io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _plot_confusion(plt, path: Path, cm: np.ndarray, classes: list[str], accuracy: float) -> None:
    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = min(max(4.0, 0.55 * k + 2), 30.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class (row)")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 or max(map(len, classes)) > 4 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"test confusion matrix (accuracy {accuracy:.4f}, {int(cm.sum())} items)")
    if k <= 40:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    save_png(path, fig)


def _plot_reliability(plt, path: Path, table: list[dict], ece: float, bins: int) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / bins
    centres = [(r["lower"] + r["upper"]) / 2 for r in table]
    used = [r for r in table if r["count"]]
    top.bar(centres, [r["accuracy"] or 0.0 for r in table], width=width, edgecolor="black", alpha=0.8,
            label="accuracy")
    mid = [(r["lower"] + r["upper"]) / 2 for r in used]
    top.vlines(mid, [r["accuracy"] for r in used], [r["confidence"] for r in used], color="red", lw=2,
               label="gap (accuracy vs confidence)")
    top.scatter(mid, [r["confidence"] for r in used], marker="_", s=300 * width * 15, color="red", zorder=3,
                label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"reliability (ECE {ece:.4f}, {bins} bins)")
    top.legend(loc="upper left")
    bottom.bar(centres, [r["count"] for r in table], width=width, edgecolor="black")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("items")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    save_png(path, fig)


def _summary_md(result: dict, ledger_status: str) -> str:
    m, classes = result["metrics"], result["classes"]
    cm = np.asarray(m["confusion_matrix"])
    lines = [f"# Test evaluation: {result['model_name']}", "",
             (f"- accuracy **{m['accuracy']:.4f}**, macro F1 **{m['macro_f1']:.4f}**, NLL loss {m['loss']:.4f}, "
              f"ECE {m['ece']:.4f} ({len(m['reliability'])} bins)"),
             f"- {m['rows']} test items, {len(classes)} classes",
             f"- model `{result['model_sha256']}` ({result['checkpoint']}), scored {result['time']}",
             (f"- frozen test split: manifest `{result['manifest_sha256']}`, shard index "
              f"`{result['shard_index_sha256']}`"),
             f"- test looks on this split: {result['looks']}"
             + (" — **test set reused**: this estimate is biased toward models that fit this test set"
                if result["test_reused"] else " (first look)"),
             "", "## Ledger", "", ledger_status, "", *_audit_md(result.get("feature_audit")), "## Per class", "",
             "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
              for r in m["per_class"]]
    off = [(int(cm[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes))
           if i != j and cm[i, j] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    lines += ["", "## Most confused pairs (actual → predicted)", ""]
    if off:
        lines += ["| actual | predicted | count | share of actual |", "|---|---|---:|---:|"]
        support = cm.sum(1)
        lines += [f"| {a} | {p} | {c} | {c / support[classes.index(a)]:.1%} |" for c, a, p in off[:10]]
    else:
        lines.append("none: every test item was classified correctly")
    return "\n".join(lines) + "\n"


def _audit_md(audit: dict | None) -> list[str]:
    audit = audit or feature_audit.NOT_RECORDED
    lines = ["## Feature-space near-duplicates", "", feature_audit.summary_line(audit) + "."]
    if audit.get("enabled"):
        lines += ["", (f"By chance about {audit['expected_by_chance']:.1f} test items would be flagged (the "
                       f"quantile x {audit['test_rows']} test items, when test and train are alike); more points "
                       "to leakage. The closest pairs: `feature_duplicates.png`; all: `feature_duplicates.json`.")]
        if audit["flagged"]:
            lines += ["", "| test id | label | pred | nearest train id | train label | distance |",
                      "|---|---|---|---|---|---:|"]
            lines += [f"| `{r['id'][:12]}` | {r['label']} | {r['pred']} | `{r['train_id'][:12]}` | "
                      f"{r['train_label']} | {r['distance']:.4f} |" for r in audit["flagged"][:10]]
    return [*lines, ""]


def write_outputs(paths: Paths, result: dict, pred_table: pa.Table, reused_result: bool, ledger_status: str) -> dict:
    """Every stage output, rendered from one recorded result (so a returned result reproduces them exactly)."""
    out = Path(paths.evaluate_dir)
    classes, m = result["classes"], result["metrics"]
    labels = pred_table.column("label").to_numpy()
    preds = pred_table.column("pred").to_numpy()
    names = np.asarray(classes, dtype=object)
    cm = np.asarray(m["confusion_matrix"])
    io.write_text(out / "confusion.csv", _csv_text(["actual", "predicted"],
                                                   [[names[a], names[p]] for a, p in zip(labels, preds)]))
    io.write_text(out / "per_class.csv", _csv_text(
        ["class", "precision", "recall", "f1", "support"],
        [[r["class"], f"{r['precision']:.6f}", f"{r['recall']:.6f}", f"{r['f1']:.6f}", r["support"]]
         for r in m["per_class"]]))
    full = pa.table({"id": pred_table.column("id"), "label": pred_table.column("label"),
                     "pred": pred_table.column("pred"),
                     "label_name": pa.array(names[labels].tolist(), pa.string()),
                     "pred_name": pa.array(names[preds].tolist(), pa.string()),
                     "probs": pred_table.column("probs")})
    io.write_table(out / "predictions.parquet", full)
    try:
        plt = pyplot()
    except ImportError:  # e.g. a GPU node with torch + timm + pyarrow only: the CSVs carry the same numbers
        print("evaluate: matplotlib not installed; skipping confusion.png and reliability.png", file=sys.stderr)
    else:
        _plot_confusion(plt, out / "confusion.png", cm, classes, m["accuracy"])
        _plot_reliability(plt, out / "reliability.png", m["reliability"], m["ece"], len(m["reliability"]))
    audit = result.get("feature_audit") or feature_audit.NOT_RECORDED
    io.write_json(out / "feature_duplicates.json", audit_record(audit))
    with io.atomic_path(out / "feature_duplicates.png") as tmp:
        tmp.write_bytes(feature_audit.render_pairs(audit, audit.get("pairs", [])))
    head = headline(result, reused_result)
    io.write_text(out / "summary.md", _summary_md(result, ledger_status))
    io.write_json(paths.test_metrics, head)  # last: its presence means the stage finished
    return head


def remove_stale_outputs(paths: Paths, sha: str) -> None:
    """After a refusal, outputs describing another model must not sit beside this best.pt (DVC would have removed
    them too); only the files this stage writes are touched."""
    metrics = Path(paths.test_metrics)
    try:
        stale = json.loads(metrics.read_text()).get("model_sha256") != sha if metrics.exists() else False
    except (OSError, ValueError):
        stale = True
    if stale:
        metrics.unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            (Path(paths.evaluate_dir) / name).unlink(missing_ok=True)
        print(f"evaluate: removed {metrics} and {paths.evaluate_dir}/* of an earlier model (they do not describe "
              "this best.pt; evaluating that model again restores them from the ledger)", file=sys.stderr)
