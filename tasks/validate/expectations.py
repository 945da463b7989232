"""The expectation suite of the validate stage, built from ``params.yaml:validate``: one batch per split (train, val,
test), one of every assigned item (checks that span splits) and one of derived per-split numbers (checks GX has
no expectation for).  Each expectation carries its hint (what it guarantees, what to do) as its notes.

Great Expectations is imported inside ``batches`` only: importing it costs about 3 s.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from tasks.core.config import ValidateConfig
from tasks.core.io import SPLITS
from tasks.validate.inputs import stats_detail
from tasks.validate.result import Batch, SplitStats

ALL = "all"                          # batch of every assigned item, for checks that span splits
STATS = "label_stats"                # batch of derived per-split numbers (one row per split)

# Columns of the frame each split is validated on, with the pandas type GX must observe.  Integers are
# converted to nullable pandas dtypes (see inputs._nullable_ints) so a missing value does not silently turn int32
# into float64 and hide the real problem behind a type failure.
EXPECTED_TYPES: dict[str, str] = {
    "id": "str", "label": "str", "split": "str", "unit": "str",
    "raw_label": "str", "width": "int32", "height": "int32",
}
NOT_NULL = ("id", "label", "width", "height")


# ---------------------------------------------------------------- the suite
def batches(frame: pd.DataFrame, classes: list[str], stats: dict[str, SplitStats],
             cfg: ValidateConfig) -> list[Batch]:
    import great_expectations.expectations as gxe

    out = []
    for split in SPLITS:
        rows = frame.loc[frame["split"] == split, list(EXPECTED_TYPES)].reset_index(drop=True)
        out.append(Batch(split, rows, "id", _split_expectations(gxe, classes, cfg), split=split))

    # Cross-split checks on one row per (id, split): an id in two splits is leakage; an unknown or null split
    # value would otherwise drop the item silently from every per-split batch.
    assigned = frame[["id", "split"]].drop_duplicates().reset_index(drop=True)
    out.append(Batch(ALL, assigned, "id", [
        gxe.ExpectColumnValuesToNotBeNull(column="split", notes=_hint("not_null", "split", cfg)),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS),
                                        notes=_hint("split_in_set", "split", cfg)),
        gxe.ExpectColumnValuesToBeUnique(column="id", notes=_hint("cross_split_unique", "id", cfg)),
    ], split=ALL))

    # GX has no expectation for a class-count ratio or a distance between two label distributions, so they
    # are computed in pandas and checked as columns of a one-row-per-split frame (NaN = not applicable,
    # which GX treats as missing and skips).  The index column "split" maps a failure back to its split.
    derived = pd.DataFrame({
        "split": list(SPLITS),
        "rows": [stats[s].rows for s in SPLITS],
        "imbalance_ratio": [_nan(stats[s].imbalance_ratio) for s in SPLITS],
        "label_tv_distance": [_nan(stats[s].label_tv_distance) for s in SPLITS],
        "detail": [stats_detail(s, stats, classes) for s in SPLITS],
    })
    out.append(Batch(STATS, derived, "split", [
        gxe.ExpectColumnValuesToBeBetween(column="imbalance_ratio", max_value=cfg.max_imbalance_ratio,
                                          notes=_hint("imbalance", "imbalance_ratio", cfg)),
        gxe.ExpectColumnValuesToBeBetween(column="label_tv_distance",
                                          max_value=cfg.max_label_distribution_distance,
                                          notes=_hint("tv", "label_tv_distance", cfg)),
    ]))
    return out


def _split_expectations(gxe: Any, classes: list[str], cfg: ValidateConfig) -> list[Any]:
    exps: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=1, notes=_hint("rows", None, cfg))]
    for column, type_ in EXPECTED_TYPES.items():
        exps.append(gxe.ExpectColumnToExist(column=column, notes=_hint("exists", column, cfg)))
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=column, type_=type_,
                                                     notes=_hint("type", column, cfg)))
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c, notes=_hint("not_null", c, cfg)) for c in NOT_NULL]
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
        "type": f"column {column!r} has type {EXPECTED_TYPES.get(column or '')} (storage contract in "
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


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
