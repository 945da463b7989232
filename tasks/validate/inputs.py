"""What validate checks: the split manifest joined with the raw item metadata, and the per-split numbers derived
from it (class counts, train's class imbalance, each split's label-distribution distance from train)."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pyarrow as pa

from tasks.core.config import Paths, ValidateConfig
from tasks.core.io import SPLITS, DataError, read_manifest, read_raw_meta
from tasks.validate.result import SplitStats

EXCLUDED = "excluded"


# ---------------------------------------------------------------- inputs
def _nullable_ints(arrow_type: pa.DataType) -> Any:
    # Keep integer columns integer even when the join leaves a hole (an id missing from raw items).
    return {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(),
            pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get(arrow_type)


def load(paths: Paths) -> tuple[pd.DataFrame, int, int]:
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

    is_excluded = (man_df["split"] == EXCLUDED).fillna(False).astype(bool)
    not_in_manifest = int((~raw_df["id"].isin(man_df["id"])).sum())
    # A left join keeps manifest ids that have no raw item (null width/height: caught by not-null) and
    # multiplies ids duplicated in either table (caught by the uniqueness checks).
    frame = man_df[~is_excluded].merge(raw_df, on="id", how="left", sort=False)
    return frame.reset_index(drop=True), int(is_excluded.sum()), not_in_manifest


def declared_classes(cfg: ValidateConfig, frame: pd.DataFrame) -> tuple[list[str], str]:
    if cfg.classes is not None:
        return list(cfg.classes), "validate.classes"
    train_labels = frame.loc[frame["split"] == "train", "label"].dropna().unique()
    return sorted(str(v) for v in train_labels), "train labels"


# ---------------------------------------------------------------- derived statistics
def split_stats(frame: pd.DataFrame, classes: list[str]) -> dict[str, SplitStats]:
    counts = {s: frame.loc[frame["split"] == s, "label"].value_counts(dropna=True) for s in SPLITS}
    train = counts["train"]
    stats: dict[str, SplitStats] = {}
    for split in SPLITS:
        c = counts[split]
        rows = int((frame["split"] == split).sum())
        class_counts = {str(k): int(v) for k, v in c.sort_index().items()}
        if split == "train":
            stats[split] = SplitStats(rows, class_counts, imbalance_ratio=_imbalance(train, classes))
        else:
            stats[split] = SplitStats(rows, class_counts, label_tv_distance=_tv_distance(train, c))
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


def stats_detail(split: str, stats: dict[str, SplitStats], classes: list[str]) -> str:
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
