"""The checks on the data before any model sees it: items 1 (the ingest audit was done and can be looked at) and
2 (the splits are frozen and leak-free). They read reports and the manifest only, never the images."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.core import io
from tasks.core.config import Paths
from tasks.discipline.preflight.report import CheckItem


# ---------------------------------------------------------------- 1. data audit
def data_audit(paths: Paths) -> CheckItem:
    name = "data_audit"
    audit_dir = Path(paths.audit_dir)
    path = audit_dir / "audit.json"
    if not path.is_file():
        return CheckItem(name, "fail", {"audit": str(path), "exists": False},
                         f"{path} is missing: run `keel ingest` (dvc repro ingest), then read reports/audit/audit.md")
    try:
        audit = json.loads(path.read_text())
    except ValueError as exc:
        return CheckItem(name, "fail", {"audit": str(path)}, f"{path} is not valid JSON ({exc}); re-run `keel ingest`")
    per_class = audit.get("per_class") or {}
    conditions = sorted({k for v in per_class.values() if isinstance(v, dict) for k in v if k != "count"})
    sheet = audit_dir / str((audit.get("contact_sheet") or {}).get("file", "contact_sheet.png"))
    plots = {p: (audit_dir / p).is_file() for p in ("class_counts.png", "resolution.png", "brightness.png")}
    ev = {"audit": str(path), "classes": len(audit.get("class_counts") or {}),
          "imbalance_ratio": audit.get("imbalance_ratio"), "condition_features": conditions,
          "label_sample_sheet": str(sheet), "label_sample_sheet_exists": sheet.is_file(), "plots": plots,
          "found": audit.get("found"), "rejected": audit.get("rejected")}
    missing = []
    if not audit.get("class_counts"):
        missing.append("class distribution (class_counts)")
    if not conditions:
        missing.append("condition distribution (per-class width/height/brightness)")
    if not sheet.is_file():
        missing.append(f"label sample sheet ({sheet})")
    missing += [f"plot {p}" for p, ok in plots.items() if not ok]
    if missing:
        return CheckItem(name, "fail", ev, f"the audit lacks {', '.join(missing)}: re-run `keel ingest` and look "
                         "at the contact sheet and distributions before training")
    return CheckItem(name, "pass", ev, "none (look at reports/audit/audit.md and the contact sheet yourself)")


# ---------------------------------------------------------------- 2. splits frozen
def splits_frozen(paths: Paths) -> CheckItem:
    name = "splits_frozen"
    manifest = Path(paths.split_manifest)
    sha_file = Path(f"{manifest}.sha256")
    leak = Path(paths.leakage_report)
    ev: dict = {"manifest": str(manifest), "manifest_exists": manifest.is_file(), "sha256_file": str(sha_file),
                "leakage_report": str(leak)}
    if not manifest.is_file():
        return CheckItem(name, "fail", ev, f"the split manifest {manifest} is missing: run `keel split` "
                         "(dvc repro split) before anything looks at the data")
    actual = io.sha256_file(manifest)
    ev["manifest_sha256"] = actual
    recorded = sha_file.read_text().split()[0] if sha_file.is_file() and sha_file.read_text().strip() else None
    ev["recorded_sha256"] = recorded
    if recorded is None:
        return CheckItem(name, "fail", ev, f"{sha_file} is missing: the manifest's hash was never recorded; re-run "
                         "`keel split` (it writes both)")
    if recorded != actual:
        return CheckItem(name, "fail", ev, f"{manifest} does not match its recorded hash {recorded[:12]}… (now "
                         f"{actual[:12]}…): the frozen split was changed outside `keel split`; restore it "
                         "(dvc checkout) or re-split deliberately with `keel split --refreeze`")
    try:
        report = json.loads(leak.read_text())
    except (OSError, ValueError):
        return CheckItem(name, "fail", ev, f"{leak} is missing or unreadable: re-run `keel split`")
    ev.update(leakage_passed=report.get("passed"), leakage_problems=len(report.get("problems") or []),
              counts=report.get("counts"))
    if report.get("passed") is not True:
        return CheckItem(name, "fail", ev, f"the leakage check failed ({report.get('problems')}); fix the "
                         "duplicates/groups, then `keel split`")
    return CheckItem(name, "pass", ev, "none")

