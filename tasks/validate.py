"""The validate stage: a Great Expectations gate between ``split`` and ``shard``.

Reads the raw item metadata (no image bytes) joined on ``id`` with the split manifest, builds an expectation
suite from ``params.yaml:validate`` and runs it per split (train, val, test), so every failure names its split.
Checks that GX has no expectation for (class imbalance, label-distribution distance) are computed here in pandas
and still run through a GX expectation on a small derived frame, so that *every* check shows up in the GX
results and the Data Docs.

Writes, atomically, under ``paths.validate_dir``:
    results.json   the GX validation results, one entry per batch
    summary.json   success, per-split stats, each failed expectation with split, type, column, count, sample ids
    summary.md     the same for people
    docs/          Data Docs HTML (``docs/index.html``)
If an expectation fails the reports are still written, then ``ValidationFailed`` is raised with a readable list.

Great Expectations is imported inside functions only: importing it costs about 3 s.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from tasks.core.config import Paths, ValidateConfig
from tasks.core.errors import UserError
from tasks.core.io import SPLITS, DataError, atomic_dir, read_manifest, read_raw_meta, write_json, write_text

_SITE = "keel"                       # the one Data Docs site; named so UpdateDataDocsAction touches only it
_ALL = "all"                         # batch of every assigned item, for checks that span splits
_STATS = "label_stats"               # batch of derived per-split numbers (one row per split)
_EXCLUDED = "excluded"
_SHORT_ID = 12                       # hex characters of an id shown in messages (full ids go to summary.json)

# Columns of the frame each split is validated on, with the pandas type GX must observe.  Integers are
# converted to nullable pandas dtypes (see _nullable_ints) so a missing value does not silently turn int32 into
# float64 and hide the real problem behind a type failure.
_EXPECTED_TYPES: dict[str, str] = {
    "id": "str", "label": "str", "split": "str", "unit": "str",
    "raw_label": "str", "width": "int32", "height": "int32",
}
_NOT_NULL = ("id", "label", "width", "height")


class ValidationFailed(UserError):
    """At least one expectation failed; the message lists each failure (split, check, ids, what to do)."""

    def __init__(self, message: str, result: ValidateResult | None = None) -> None:
        # result is optional so the exception survives pickling (orchestrators ship exceptions between processes).
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class _SplitStats:
    rows: int
    class_counts: dict[str, int]
    imbalance_ratio: float | None = None       # train only: largest / smallest declared-class count
    label_tv_distance: float | None = None     # val/test only: total-variation distance from train's shares


@dataclass(frozen=True)
class _Failure:
    split: str
    expectation: str
    column: str | None
    unexpected_count: int | None
    sample_ids: list[str]
    observed: str        # offending values, missing classes or the observed number, in words
    hint: str            # what the check guarantees and what to do about it

    def line(self) -> str:
        what = []
        if self.unexpected_count is not None:
            what.append(f"{self.unexpected_count} unexpected")
        if self.observed:
            what.append(f"({self.observed})" if what else self.observed)
        text = f"{self.split}: {self.expectation}({self.column or ''}): {' '.join(what) or 'failed'}"
        if self.sample_ids:
            text += ", e.g. ids " + ", ".join(_short(i) for i in self.sample_ids)
        return text


@dataclass
class ValidateResult:
    success: bool
    splits: dict[str, _SplitStats]
    failures: list[_Failure]
    classes: list[str]
    classes_source: str          # "validate.classes" or "train labels"
    excluded: int                # manifest rows with split == excluded (not validated)
    not_in_manifest: int         # raw items the manifest does not mention
    expectations: int            # expectations evaluated in total
    report_dir: str = ""
    docs_index: str = ""

    def to_json(self) -> dict[str, Any]:
        return _finite(asdict(self))


@dataclass
class _Batch:
    """One GX batch: a frame, its suite, and how to name the split of an unexpected row."""
    name: str
    frame: pd.DataFrame
    index_column: str                    # GX reports this column's value for each unexpected row
    expectations: list[Any] = field(default_factory=list)
    split: str | None = None             # None: the split is the index column's value (the stats frame)


# ---------------------------------------------------------------- public entry point
def run(cfg: ValidateConfig, paths: Paths) -> ValidateResult:
    frame, excluded, not_in_manifest = _load(paths)
    classes, classes_source = _declared_classes(cfg, frame)
    stats = _split_stats(frame, classes)
    batches = _batches(frame, classes, stats, cfg)
    out_dir = Path(paths.validate_dir)

    with atomic_dir(out_dir) as tmp:
        # Data Docs are built straight into the temporary directory, so a killed run leaves no half site.
        results = _run_gx(batches, (tmp / "docs").resolve(), cfg.sample_ids)
        failures = [f for batch, vr in results for f in _failures(batch, vr, cfg.sample_ids)]
        result = ValidateResult(
            success=not failures, splits=stats, failures=failures, classes=classes,
            classes_source=classes_source, excluded=excluded, not_in_manifest=not_in_manifest,
            expectations=sum(len(vr.results) for _, vr in results),
            report_dir=str(out_dir), docs_index=str(out_dir / "docs" / "index.html"))
        write_json(tmp / "results.json", _finite({
            "success": result.success,
            "batches": [{"name": b.name, "split": b.split, "result": vr.to_json_dict()} for b, vr in results],
        }))
        write_json(tmp / "summary.json", result.to_json())
        write_text(tmp / "summary.md", _summary_md(result))

    if failures:
        raise ValidationFailed(_message(result), result)
    for split in SPLITS:
        print(f"validate: {_split_line(split, stats[split], classes, cfg)}")
    print(f"validate: {result.expectations} expectations passed; Data Docs at {result.docs_index}")
    return result


# ---------------------------------------------------------------- inputs
def _nullable_ints(arrow_type: pa.DataType) -> Any:
    # Keep integer columns integer even when the join leaves a hole (an id missing from raw items).
    return {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
            pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get(arrow_type)


def _load(paths: Paths) -> tuple[pd.DataFrame, int, int]:
    """Manifest rows (excluded ones dropped) left-joined with raw metadata; plus excluded / unassigned counts."""
    try:
        raw = read_raw_meta(paths.raw_items)
    except pa.ArrowInvalid as exc:
        # pyarrow's message for a part missing a column is a FieldRef dump; say what it means.
        raise DataError(f"{paths.raw_items}: raw items do not match the storage contract in tasks/core/io.py "
                        f"({str(exc).splitlines()[0]}); re-run `keel ingest`") from None
    manifest, _meta = read_manifest(paths.split_manifest)
    raw_df = (raw.select(["id", "label", "width", "height"])
              .rename_columns(["id", "raw_label", "width", "height"])
              .to_pandas(types_mapper=_nullable_ints))
    man_df = manifest.select(["id", "label", "split", "unit"]).to_pandas(types_mapper=_nullable_ints)

    is_excluded = (man_df["split"] == _EXCLUDED).fillna(False).astype(bool)
    not_in_manifest = int((~raw_df["id"].isin(man_df["id"])).sum())
    # A left join keeps manifest ids that have no raw item (null width/height: caught by not-null) and
    # multiplies ids duplicated in either table (caught by the uniqueness checks).
    frame = man_df[~is_excluded].merge(raw_df, on="id", how="left", sort=False)
    return frame.reset_index(drop=True), int(is_excluded.sum()), not_in_manifest


def _declared_classes(cfg: ValidateConfig, frame: pd.DataFrame) -> tuple[list[str], str]:
    if cfg.classes is not None:
        return list(cfg.classes), "validate.classes"
    train_labels = frame.loc[frame["split"] == "train", "label"].dropna().unique()
    return sorted(str(v) for v in train_labels), "train labels"


# ---------------------------------------------------------------- derived statistics
def _split_stats(frame: pd.DataFrame, classes: list[str]) -> dict[str, _SplitStats]:
    counts = {s: frame.loc[frame["split"] == s, "label"].value_counts(dropna=True) for s in SPLITS}
    train = counts["train"]
    stats: dict[str, _SplitStats] = {}
    for split in SPLITS:
        c = counts[split]
        rows = int((frame["split"] == split).sum())
        class_counts = {str(k): int(v) for k, v in c.sort_index().items()}
        if split == "train":
            stats[split] = _SplitStats(rows, class_counts, imbalance_ratio=_imbalance(train, classes))
        else:
            stats[split] = _SplitStats(rows, class_counts, label_tv_distance=_tv_distance(train, c))
    return stats


def _imbalance(train_counts: pd.Series, classes: list[str]) -> float | None:
    """Largest / smallest count over the declared classes; inf when a declared class has no train item."""
    if not classes:
        return None        # nothing declared and train empty: the row-count check reports it
    per_class = train_counts.reindex(classes, fill_value=0)
    smallest, largest = int(per_class.min()), int(per_class.max())
    return math.inf if smallest == 0 else largest / smallest


def _tv_distance(train_counts: pd.Series, counts: pd.Series) -> float | None:
    """0.5 * sum |p - q| over the union of labels; None when either split is empty (undefined)."""
    if train_counts.sum() == 0 or counts.sum() == 0:
        return None
    labels = train_counts.index.union(counts.index)
    p = train_counts.reindex(labels, fill_value=0) / train_counts.sum()
    q = counts.reindex(labels, fill_value=0) / counts.sum()
    return float(0.5 * (p - q).abs().sum())


# ---------------------------------------------------------------- the suite
def _batches(frame: pd.DataFrame, classes: list[str], stats: dict[str, _SplitStats],
             cfg: ValidateConfig) -> list[_Batch]:
    import great_expectations.expectations as gxe

    batches = []
    for split in SPLITS:
        rows = frame.loc[frame["split"] == split, list(_EXPECTED_TYPES)].reset_index(drop=True)
        batches.append(_Batch(split, rows, "id", _split_expectations(gxe, classes, cfg), split=split))

    # Cross-split checks on one row per (id, split): an id in two splits is leakage; an unknown or null split
    # value would otherwise drop the item silently from every per-split batch.
    assigned = frame[["id", "split"]].drop_duplicates().reset_index(drop=True)
    batches.append(_Batch(_ALL, assigned, "id", [
        gxe.ExpectColumnValuesToNotBeNull(column="split", notes=_hint("not_null", "split", cfg)),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                        notes=_hint("split_in_set", "split", cfg)),
        gxe.ExpectColumnValuesToBeUnique(column="id", notes=_hint("cross_split_unique", "id", cfg)),
    ], split=_ALL))

    # GX has no expectation for a class-count ratio or a distance between two label distributions, so they
    # are computed in pandas and checked as columns of a one-row-per-split frame (NaN = not applicable,
    # which GX treats as missing and skips).  The index column "split" maps a failure back to its split.
    derived = pd.DataFrame({
        "split": list(SPLITS),
        "rows": [stats[s].rows for s in SPLITS],
        "imbalance_ratio": [_nan(stats[s].imbalance_ratio) for s in SPLITS],
        "label_tv_distance": [_nan(stats[s].label_tv_distance) for s in SPLITS],
        "detail": [_stats_detail(s, stats, classes) for s in SPLITS],
    })
    batches.append(_Batch(_STATS, derived, "split", [
        gxe.ExpectColumnValuesToBeBetween(column="imbalance_ratio", max_value=cfg.max_imbalance_ratio,
                                          notes=_hint("imbalance", "imbalance_ratio", cfg)),
        gxe.ExpectColumnValuesToBeBetween(column="label_tv_distance",
                                          max_value=cfg.max_label_distribution_distance,
                                          notes=_hint("tv", "label_tv_distance", cfg)),
    ]))
    return batches


def _split_expectations(gxe: Any, classes: list[str], cfg: ValidateConfig) -> list[Any]:
    exps: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=1, notes=_hint("rows", None, cfg))]
    for column, type_ in _EXPECTED_TYPES.items():
        exps.append(gxe.ExpectColumnToExist(column=column, notes=_hint("exists", column, cfg)))
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_=type_,
                                                     notes=_hint("type", column, cfg)))
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c, notes=_hint("not_null", c, cfg)) for c in _NOT_NULL]
    exps.append(gxe.ExpectColumnValuesToBeUnique(column="id", notes=_hint("unique", "id", cfg)))
    exps.append(gxe.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_width, max_value=cfg.max_width,
                                                  notes=_hint("size", "width", cfg)))
    exps.append(gxe.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_height,
                                                  max_value=cfg.max_height, notes=_hint("size", "height", cfg)))
    # The manifest copies each item's label from raw items; a difference means a stale manifest.
    exps.append(gxe.ExpectColumnPairValuesToBeEqual(column_A="label", column_B="raw_label",
                                                    ignore_row_if="either_value_is_missing",
                                                    notes=_hint("label_agrees", "label", cfg)))
    if classes:    # empty only when train is empty and no classes are declared: the row count reports that
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes,
                                                    notes=_hint("in_set", "label", cfg)))
        exps.append(gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=classes,
                                                               notes=_hint("contains", "label", cfg)))
    return exps


def _hint(check: str, column: str | None, cfg: ValidateConfig) -> str:
    """What the check guarantees and what to do when it fails (in messages, reports and Data Docs notes)."""
    if check == "not_null" and column in ("width", "height"):
        return ("every item has a size: a null means the manifest names an id that is not in raw items "
                "(stale manifest: re-run `keel split`) or ingest stored no size (re-run `keel ingest`)")
    hints = {
        "rows": "every split has items: adjust split.fractions or add data, then re-run `keel split`",
        "exists": f"column {column!r} is part of the storage contract (tasks/core/io.py): re-run `keel ingest` "
                  "and `keel split` with this keel version",
        "type": f"column {column!r} has type {_EXPECTED_TYPES.get(column or '')} (storage contract in "
                "tasks/core/io.py): the writer broke the contract; re-run `keel ingest` and `keel split` with this "
                "keel version",
        "not_null": f"no item has a null {column}: fix the source or the manifest, then re-run `keel split`",
        "unique": "each id appears once in a split: remove duplicated rows from raw items or the manifest "
                  "(re-run `keel ingest` and `keel split`)",
        "cross_split_unique": "an id belongs to one split only (otherwise test leaks into train): re-run "
                              "`keel split`, which keeps duplicates together",
        "split_in_set": "split is one of train, val, test, excluded: fix the manifest (re-run `keel split`)",
        "size": f"image {column} is within [{getattr(cfg, f'min_{column}', '')}, "
                f"{getattr(cfg, f'max_{column}', '')}]: drop or fix these images at the source, or widen "
                f"validate.min_{column} / validate.max_{column} deliberately",
        "label_agrees": "the manifest label equals the raw items label: the manifest is stale; re-run `keel split`",
        "in_set": "labels belong to the declared class set: fix the labels at the source, or declare the class "
                  "in validate.classes",
        "contains": "every class has items in train, val and test: add data for the missing class or change "
                    "split.fractions, then re-run `keel split`",
        "imbalance": f"largest/smallest class count in train is at most {cfg.max_imbalance_ratio:g}: collect or "
                     "resample the small classes, or raise validate.max_imbalance_ratio deliberately",
        "tv": f"val and test label shares are within total-variation distance "
              f"{cfg.max_label_distribution_distance:g} of train's: re-split (stratified) or raise "
              "validate.max_label_distribution_distance deliberately",
    }
    return hints[check]


# ---------------------------------------------------------------- running GX
def _context(docs_dir: Path) -> Any:
    """An in-memory context whose only Data Docs site is ``docs_dir`` (nothing written anywhere else)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # init_temp_docs_sites=False: the default "local_site" would build into a fresh /tmp folder.
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={_SITE: {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_gx(batches: list[_Batch], docs_dir: Path, sample_ids: int) -> list[tuple[_Batch, Any]]:
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("keel")
    results = []
    for batch in batches:
        definition = source.add_dataframe_asset(batch.name).add_batch_definition_whole_dataframe(batch.name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"keel_{batch.name}"))
        for expectation in batch.expectations:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"keel_{batch.name}", data=definition, suite=suite))
        # One checkpoint per batch: Checkpoint.run hands the same batch_parameters (one dataframe) to all of
        # its validation definitions, and each batch here is a different frame.
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"keel_{batch.name}",
            validation_definitions=[validation],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[_SITE])],
            result_format={
                "result_format": "SUMMARY",
                # Map each unexpected value back to its row: the id (or the split, for the derived frame).
                "unexpected_index_column_names": [batch.index_column],
                "partial_unexpected_count": max(sample_ids, 20),
            },
        ))
        outcome = checkpoint.run(batch_parameters={"dataframe": batch.frame})
        (validation_result,) = outcome.run_results.values()
        results.append((batch, validation_result))
    return results


# ---------------------------------------------------------------- failures
def _failures(batch: _Batch, validation_result: Any, sample_ids: int) -> list[_Failure]:
    failures: list[_Failure] = []
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
                failures.append(_Failure(
                    split=str(entry[batch.index_column]), expectation=config.type, column=column,
                    unexpected_count=None, sample_ids=[],
                    observed=f"{_fmt(entry.get(column))} > max {_fmt(bound)}; {detail.get(entry[batch.index_column], '')}",
                    hint=hint))
            continue

        # A duplicated id is unexpected once per copy; show each id once.
        ids = list(dict.fromkeys(_id_text(entry.get("id")) for entry in index_list))[:sample_ids]
        failures.append(_Failure(
            split=batch.split, expectation=config.type, column=column,
            unexpected_count=res.get("unexpected_count"), sample_ids=ids,
            observed=_observed(batch, er, ids), hint=hint))
    return failures


def _observed(batch: _Batch, er: Any, ids: list[str]) -> str:
    """The offending values in words: unexpected values, missing classes, observed type or an exception."""
    res = er.result or {}
    errors = _exception_messages(er.exception_info)
    if errors:
        return "error: " + "; ".join(errors)
    if batch.name == _ALL and er.expectation_config.type == "expect_column_values_to_be_unique":
        where = batch.frame[batch.frame["id"].isin(ids)].groupby("id")["split"].agg(lambda s: sorted(s.dropna()))
        return "; ".join(f"{_short(i)} in {', '.join(where.get(i, []))}" for i in ids)
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


def _stats_detail(split: str, stats: dict[str, _SplitStats], classes: list[str]) -> str:
    """Which classes drive the derived number, so a failure says where to look."""
    counts = pd.Series(stats[split].class_counts, dtype="int64")
    if split == "train":
        if not classes:
            return ""
        declared = counts.reindex(classes, fill_value=0)
        return (f"largest {declared.idxmax()}: {declared.max()}, smallest {declared.idxmin()}: "
                f"{declared.min()}")
    train = pd.Series(stats["train"].class_counts, dtype="int64")
    if counts.empty or train.empty:
        return ""
    labels = train.index.union(counts.index)
    p = train.reindex(labels, fill_value=0) / train.sum()
    q = counts.reindex(labels, fill_value=0) / counts.sum()
    worst = (q - p).abs().idxmax()
    return f"largest gap {worst}: {q[worst]:.0%} in {split} vs {p[worst]:.0%} in train"


# ---------------------------------------------------------------- reports
def _message(result: ValidateResult) -> str:
    n_splits = len({f.split for f in result.failures})
    lines = [f"validation failed: {len(result.failures)} expectation(s) on {n_splits} split(s)"]
    for f in result.failures:
        lines.append(f"  - {f.line()}")
        lines.append(f"      expected: {f.hint}")
    lines.append(f"see {Path(result.report_dir) / 'summary.md'} and {result.docs_index}")
    return "\n".join(lines)


def _split_line(split: str, s: _SplitStats, classes: list[str], cfg: ValidateConfig) -> str:
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


def _short(id_: str) -> str:
    return id_ if len(id_) <= _SHORT_ID + 1 else id_[:_SHORT_ID] + "…"


def _is_null(value: Any) -> bool:
    # GX hands back None, NaN or pd.NA for a missing value, depending on the column's dtype.
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _id_text(value: Any) -> str:
    return "(null id)" if _is_null(value) else str(value)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _fmt(value: Any) -> str:
    if _is_null(value):
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3g}"
    return repr(value) if isinstance(value, str) else str(value)


def _finite(obj: Any) -> Any:
    """Replace inf/NaN (a class with no train item gives an infinite ratio) so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
