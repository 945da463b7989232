"""What a person sees of a finished run in the Prefect UI: one artifact per stage report, and the run itself.

    keel-data-audit (table)  keel-leakage  keel-validation  keel-training  keel-test-metrics (table)
    keel-model (+ keel-model-link)  keel-run

Each is built by one function from one report the stages wrote; a report that is missing or malformed costs that
artifact only, with a warning: the pipeline has finished by then, and its result must not depend on a summary."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact


def read_json(path: Path) -> Any:
    """A report's content, or None when it is missing or not JSON (a summary never fails on it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _report(root: Path, rel: str) -> Any:
    data = read_json(root / rel)
    if data is None:
        raise FileNotFoundError(rel)
    return data


def _fmt(v: Any) -> str:
    # imported here, not at the top: `tasks` comes from the checkout the flow runs in (project.use_checkout)
    from tasks.core.text import fmt

    return fmt(v)


def audit(root: Path, paths) -> None:
    a = _report(root, f"{paths.audit_dir}/audit.json")
    per_class = a.get("per_class") or {}
    rows = [{"class": c, "count": n,
             "median width": (per_class.get(c) or {}).get("width", {}).get("median"),
             "median height": (per_class.get(c) or {}).get("height", {}).get("median"),
             "mean brightness": _fmt((per_class.get(c) or {}).get("brightness", {}).get("mean"))}
            for c, n in (a.get("class_counts") or {}).items()]
    create_table_artifact(rows, key="keel-data-audit", description=(
        f"Data audit of {a.get('source')}: found {a.get('found')} = ingested {a.get('ingested')} + rejected "
        f"{a.get('rejected')} (reasons: {a.get('reject_reasons') or 'none'}); imbalance "
        f"{_fmt(a.get('imbalance_ratio'))}; modes {a.get('modes')}. Plots and contact sheet: {paths.audit_dir}/"))


def leakage(root: Path, paths) -> None:
    lk = _report(root, paths.leakage_report)
    counts = lk.get("counts") or {}
    md = [f"# Split and leakage: {'passed' if lk.get('passed') else 'FAILED'}", "",
          "| split | items |", "|---|---:|", *[f"| {k} | {v} |" for k, v in counts.items()], "",
          (f"- leakage units: {lk.get('units')}; links {lk.get('links')}"),
          (f"- cross-split policy `{lk.get('cross_split_policy')}`: {len(lk.get('cross_split_items') or [])} "
           f"item(s) handled; frozen ids kept {lk.get('frozen_ids_kept')}; picture {lk.get('picture')}"),
          f"- problems: {lk.get('problems') or 'none'}"]
    cross = [p for p in lk.get("pairs") or [] if p.get("cross_source_split")]
    if cross:
        md += ["", "| check | score | transform | a | b |", "|---|---:|---|---|---|"]
        md += [f"| {p['check']} | {p.get('score')} | {p.get('transform') or ''} | {p['a']['uri']} ({p['a']['split']}) "
               f"| {p['b']['uri']} ({p['b']['split']}) |" for p in cross[:50]]
    create_markdown_artifact("\n".join(md), key="keel-leakage", description=str(paths.leakage_report))


def validation(root: Path, paths) -> None:
    s = _report(root, f"{paths.validate_dir}/summary.json")
    md = [f"# Data validation: {'PASSED' if s.get('success') else 'FAILED'}", "",
          (f"{s.get('expectations')} expectations; classes ({s.get('classes_source')}): "
           f"{', '.join(map(str, s.get('classes') or []))}"), "",
          "| split | rows | classes present | imbalance | label TV distance from train |",
          "|---|---:|---:|---:|---:|"]
    n_classes = len(s.get("classes") or [])
    for split, v in (s.get("splits") or {}).items():
        md.append(f"| {split} | {v.get('rows')} | {len(v.get('class_counts') or {})}/{n_classes} | "
                  f"{_fmt(v.get('imbalance_ratio'))} | {_fmt(v.get('label_tv_distance'))} |")
    if s.get("failures"):
        md += ["", "Failures:", *[f"- {f}" for f in s["failures"]]]
    md += ["", f"Data Docs: {s.get('docs_index')}"]
    create_markdown_artifact("\n".join(md), key="keel-validation", description=f"{paths.validate_dir}/summary.json")


def _epochs_table(csv_path: Path, plots_dir: str) -> list[str]:
    """train's per-epoch CSV as a markdown table, the first and last three epochs when there are more than six."""
    rows = [ln.split(",") for ln in csv_path.read_text().splitlines() if ln.strip()]
    head, body = rows[0], rows[1:]
    shown = body if len(body) <= 6 else body[:3] + [["..."] * len(head)] + body[-3:]
    md = ["", f"Epochs ({len(body)}; curves: {plots_dir}/curves.png):", "",
          "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    # integers (epoch, step) as written, other numbers to 4 places
    md += ["| " + " | ".join(_fmt(float(c)) if c not in ("...", "") and not c.isdigit() else c
                             for c in row) + " |" for row in shown]
    return md


def training(root: Path, paths) -> None:
    t = _report(root, paths.train_metrics)
    md = ["# Training", "", "| metric | value |", "|---|---:|", *[f"| {k} | {_fmt(v)} |" for k, v in t.items()]]
    csv_path = root / paths.train_plots_dir / "epochs.csv"
    if csv_path.is_file():
        md += _epochs_table(csv_path, paths.train_plots_dir)
    create_markdown_artifact("\n".join(md), key="keel-training", description=str(paths.train_metrics))


def evaluation(root: Path, paths) -> None:
    m = _report(root, paths.test_metrics)
    create_table_artifact([{"metric": k, "value": _fmt(v)} for k, v in m.items()], key="keel-test-metrics",
                          description=f"{paths.test_metrics} (the one read of the sealed test split)")


def _model_link(r: dict) -> None:
    """A link to the registered version: the MLflow UI page on a tracking server, else its models:/ URI."""
    name, version, uri = r.get("model_name"), r.get("version"), r.get("tracking_uri") or ""
    if uri.startswith(("http://", "https://")):
        link, text = f"{uri.rstrip('/')}/#/models/{name}/versions/{version}", f"{name} v{version} in MLflow"
    else:
        link, text = r.get("version_uri") or f"models:/{name}/{version}", f"{name} v{version} ({uri})"
    create_link_artifact(link, link_text=text, key="keel-model-link", description="registered model version")


# the register gate's threshold checks and the params.yaml key each one is held against (reports/register.json)
GATE_THRESHOLDS = {"val_accuracy": "register.min_val_accuracy", "test_accuracy": "register.min_test_accuracy",
                   "test_macro_f1": "register.min_test_macro_f1"}


def gate_failures(report: dict | None) -> list[str]:
    """Why the register gate failed, one line per failed check of ``reports/register.json`` (empty: it passed
    or there is no report): ``test_accuracy 0.6100 < register.min_test_accuracy 0.9``, else ``name: detail``."""
    out = []
    for c in ((report or {}).get("gate") or {}).get("checks") or []:
        if c.get("passed"):
            continue
        name, value, threshold = c.get("name"), c.get("value"), c.get("threshold")
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (value, threshold))
        if numeric and name in GATE_THRESHOLDS:
            out.append(f"{name} {value:.4f} < {GATE_THRESHOLDS[name]} {threshold:g}")
        elif numeric:
            out.append(f"{name} {value:.4f} < {threshold:.4f} ({c.get('detail')})")
        else:
            out.append(f"{name}: {c.get('detail')}")
    return out


def model(root: Path, paths) -> None:
    r = _report(root, paths.register_report)
    name, version, uri = r.get("model_name"), r.get("version"), r.get("tracking_uri") or ""
    failed = gate_failures(r)
    md = [f"# Model: {r.get('status')}", "", f"- model: `{name}` version **{version}**",
          f"- aliases: {', '.join('@' + a for a in r.get('aliases') or []) or 'none'}",
          f"- model URI: `{r.get('model_uri')}` (version URI `{r.get('version_uri')}`)",
          f"- tracking URI: `{uri}`; run `{r.get('run_id')}`"]
    if failed:
        md += ["- gate failed (the registry is unchanged):", *[f"  - {f}" for f in failed]]
    serve = (r.get("serve") or {}).get("command")
    if serve:
        md.append(f"- serve: `MLFLOW_TRACKING_URI={uri} {serve}`")
    create_markdown_artifact("\n".join(md), key="keel-model", description=str(paths.register_report))
    if version is not None:  # a refused or failed registration has no version to link to
        _model_link(r)


def run_summary(result: dict[str, Any]) -> None:
    md = ["# keel pipeline run", "", "| stage | status | command s | task s |", "|---|---|---:|---:|"]
    md += [f"| {s['stage']} | {s['status']}{' (forced)' if s.get('forced') else ''} | {s['command_seconds']} | "
           f"{s.get('task_seconds', '-')} |" for s in result["stages"]]
    reg = result.get("register") or {}
    md += ["", f"- register: {reg.get('status')}" + (f" version {reg['version']}" if reg.get("version") else ""),
           *[f"  - gate failed: {f}" for f in reg.get("gate_failed") or []],
           f"- overrides: {result['overrides'] or 'none'}",
           f"- dvc.lock sha256: `{result['dvc_lock']['sha256']}`",
           f"- push: {result['push']}", "", "| stage | output | md5 |", "|---|---|---|"]
    md += [f"| {st} | {path} | `{md5}` |" for st, outs in result["dvc_lock"]["stages"].items()
           for path, md5 in outs.items()]
    create_markdown_artifact("\n".join(md), key="keel-run", description="stages, overrides, data version")


def _publish(log, name: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a missing/malformed report must not fail a finished pipeline
        log.warning(f"artifact {name}: not published ({type(exc).__name__}: {exc})")


def publish_artifacts(root: Path, paths, result: dict[str, Any]) -> None:
    """Every artifact, in the DAG's order, each on its own (one that fails is a warning, the rest still go)."""
    log = get_run_logger()
    for name, fn in (("keel-data-audit", audit), ("keel-leakage", leakage), ("keel-validation", validation),
                     ("keel-training", training), ("keel-test-metrics", evaluation), ("keel-model", model)):
        _publish(log, name, lambda fn=fn: fn(root, paths))
    _publish(log, "keel-run", lambda: run_summary(result))
