"""What the validate stage hands back: per-split statistics, failed expectations, the result and its exception."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from tasks.core.errors import UserError

SHORT_ID = 12                        # hex characters of an id shown in messages (full ids go to summary.json)


class ValidationFailed(UserError):
    """At least one expectation failed; the message lists each failure (split, check, ids, what to do)."""

    def __init__(self, message: str, result: ValidateResult | None = None) -> None:
        # result is optional so the exception survives pickling (orchestrators ship exceptions between processes).
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class SplitStats:
    rows: int
    class_counts: dict[str, int]
    imbalance_ratio: float | None = None       # train only: largest / smallest declared-class count
    label_tv_distance: float | None = None     # val/test only: total-variation distance from train's shares


@dataclass(frozen=True)
class Failure:
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
            text += ", e.g. ids " + ", ".join(short(i) for i in self.sample_ids)
        return text


@dataclass
class ValidateResult:
    success: bool
    splits: dict[str, SplitStats]
    failures: list[Failure]
    classes: list[str]
    classes_source: str          # "validate.classes" or "train labels"
    excluded: int                # manifest rows with split == excluded (not validated)
    not_in_manifest: int         # raw items the manifest does not mention
    expectations: int            # expectations evaluated in total
    report_dir: str = ""
    docs_index: str = ""

    def to_json(self) -> dict[str, Any]:
        return finite(asdict(self))


@dataclass
class Batch:
    """One GX batch: a frame, its suite, and how to name the split of an unexpected row."""
    name: str
    frame: pd.DataFrame
    index_column: str                    # GX reports this column's value for each unexpected row
    expectations: list[Any] = field(default_factory=list)
    split: str | None = None             # None: the split is the index column's value (the stats frame)


def short(id_: str) -> str:
    return id_ if len(id_) <= SHORT_ID + 1 else id_[:SHORT_ID] + "…"


def finite(obj: Any) -> Any:
    """Replace inf/NaN (a class with no train item gives an infinite ratio) so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
