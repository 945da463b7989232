"""What validate tells people: each failed expectation in words (split, check, count, sample ids, hint), the
exception message, the console line per split, and the files under ``paths.validate_dir``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.config import ValidateConfig
from tasks.core.io import write_json, write_text
from tasks.validate.expectations import ALL
from tasks.validate.result import Batch, Failure, SplitStats, ValidateResult, finite, short


def write(out: Path, result: ValidateResult, results: list[tuple[Batch, Any]]) -> None:
    """results.json (GX's own results, one entry per batch), summary.json and summary.md into ``out``."""
    write_json(out / "results.json", finite({
        "success": result.success,
        "batches": [{"name": b.name, "split": b.split, "result": vr.to_json_dict()} for b, vr in results],
    }))
    write_json(out / "summary.json", result.to_json())
    write_text(out / "summary.md", _summary_md(result))


# ---------------------------------------------------------------- failures
def failures(batch: Batch, validation_result: Any, sample_ids: int) -> list[Failure]:
    out: list[Failure] = []
    for er in validation_result.results:
        if er.success:
            continue
        config = er.expectation_config
        kwargs = config.kwargs
        column = kwargs.get("column") or ",".join(kwargs[k] for k in ("column_A", "column_B") if k in kwargs) or None
        hint = _note_text(config.notes)
        res = er.result or {}
        index_list = res.get("partial_unexpected_index_list") or []

        if batch.split is None:
            detail = batch.frame.set_index(batch.index_column)["detail"]
            # Derived frame: one failure per offending split, with the observed number against the bound.
            bound = kwargs.get("max_value")
            for entry in index_list:
                out.append(Failure(
                    split=str(entry[batch.index_column]), expectation=config.type, column=column,
                    unexpected_count=None, sample_ids=[],
                    observed=f"{_fmt(entry.get(column))} > max {_fmt(bound)}; {detail.get(entry[batch.index_column], '')}",
                    hint=hint))
            continue

        # A duplicated id is unexpected once per copy; show each id once.
        ids = list(dict.fromkeys(_id_text(entry.get("id")) for entry in index_list))[:sample_ids]
        out.append(Failure(
            split=batch.split, expectation=config.type, column=column,
            unexpected_count=res.get("unexpected_count"), sample_ids=ids,
            observed=_observed(batch, er, ids), hint=hint))
    return out


def _observed(batch: Batch, er: Any, ids: list[str]) -> str:
    """The offending values in words: unexpected values, missing classes, observed type or an exception."""
    res = er.result or {}
    errors = _exception_messages(er.exception_info)
    if errors:
        return "error: " + "; ".join(errors)
    if batch.name == ALL and er.expectation_config.type == "expect_column_values_to_be_unique":
        where = batch.frame[batch.frame["id"].isin(ids)].groupby("id")["split"].agg(lambda s: sorted(s.dropna()))
        return "; ".join(f"{short(i)} in {', '.join(where.get(i, []))}" for i in ids)
    if "partial_missing_list" in res:
        return "missing " + ", ".join(map(str, res["partial_missing_list"]))
    # Values are worth showing unless they are the ids themselves (uniqueness) or all null (not-null).
    counts = [c for c in res.get("partial_unexpected_counts") or [] if not _is_null(c.get("value"))]
    if counts and er.expectation_config.type != "expect_column_values_to_be_unique":
        return "values " + ", ".join(f"{_fmt(c['value'])} x{c['count']}" for c in counts[:5])
    if "observed_value" in res:
        return f"observed {res['observed_value']}"
    return ""


def _exception_messages(info: dict | None) -> list[str]:
    """GX keeps an expectation's errors either flat or keyed by metric id; collect the messages of both."""
    if not info:
        return []
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    return list(dict.fromkeys(str(e.get("exception_message")) for e in entries if e.get("raised_exception")))


# ---------------------------------------------------------------- reports
def message(result: ValidateResult) -> str:
    n_splits = len({f.split for f in result.failures})
    lines = [f"validation failed: {len(result.failures)} expectation(s) on {n_splits} split(s)"]
    for f in result.failures:
        lines.append(f"  - {f.line()}")
        lines.append(f"      expected: {f.hint}")
    lines.append(f"see {Path(result.report_dir) / 'summary.md'} and {result.docs_index}")
    return "\n".join(lines)


def split_line(split: str, s: SplitStats, classes: list[str], cfg: ValidateConfig) -> str:
    present = sum(1 for c in classes if s.class_counts.get(c, 0) > 0)
    text = f"{split:<5} {s.rows} rows, {present}/{len(classes)} classes"
    if s.imbalance_ratio is not None:
        text += f", imbalance {_fmt(s.imbalance_ratio)} (max {cfg.max_imbalance_ratio:g})"
    if s.label_tv_distance is not None:
        text += (f", label TV distance from train {_fmt(s.label_tv_distance)} "
                 f"(max {cfg.max_label_distribution_distance:g})")
    return text


def _summary_md(result: ValidateResult) -> str:
    status = "PASSED" if result.success else f"FAILED ({len(result.failures)} expectation(s))"
    lines = [
        f"# keel validate: {status}", "",
        (f"{result.expectations} expectations evaluated. Classes ({result.classes_source}): "
         f"{', '.join(result.classes) or '(none)'}."),
        (f"Excluded by split (not validated): {result.excluded}. Raw items without a manifest entry: "
         f"{result.not_in_manifest}."), "",
        "| split | rows | classes present | imbalance (largest/smallest) | label TV distance from train |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, s in result.splits.items():
        present = sum(1 for c in result.classes if s.class_counts.get(c, 0) > 0)
        lines.append(f"| {split} | {s.rows} | {present}/{len(result.classes)} | {_fmt(s.imbalance_ratio)} "
                     f"| {_fmt(s.label_tv_distance)} |")
    if result.failures:
        lines += ["", "## Failed expectations", ""]
        for f in result.failures:
            lines.append(f"- **{f.split}** `{f.expectation}({f.column or ''})`: {f.line().split(': ', 2)[2]}")
            if f.sample_ids:
                lines.append(f"  - ids: {', '.join(f'`{i}`' for i in f.sample_ids)}")
            lines.append(f"  - expected: {f.hint}")
    lines += ["", "Data Docs: [docs/index.html](docs/index.html); raw GX results: results.json", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- small helpers
def _note_text(notes: str | list[str] | None) -> str:
    # The hint travels as the expectation's notes (Data Docs show them beside GX's own wording of the check).
    if isinstance(notes, list):
        return " ".join(notes)
    return notes or ""


def _is_null(value: Any) -> bool:
    # GX hands back None, NaN or pd.NA for a missing value, depending on the column's dtype.
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _id_text(value: Any) -> str:
    return "(null id)" if _is_null(value) else str(value)


def _fmt(value: Any) -> str:
    # Not tasks.core.text.fmt: here a missing value (None, NaN, pd.NA) reads "-", a string is quoted (repr) so an
    # offending '' or ' cat' shows, and an infinite number of either sign reads "inf".
    if _is_null(value):
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3g}"
    return repr(value) if isinstance(value, str) else str(value)
