"""Pure compute: raw metadata + links (+ the frozen manifest) -> the manifest table.

Rules, per leakage unit (a connected component of ``Links``):

* Frozen ids keep what the frozen manifest says, their split or their exclusion, with its reason: on every
  re-split, under every ``cross_split_duplicates`` policy, with data added or not.  Only new ids are decided.
* New ids in a unit whose frozen members sit in one split join it, unless the source says otherwise:
  a new source-train/val item linked to a frozen test item follows the policy (``drop_from_train`` excludes it,
  ``move_to_test`` puts it in test, ``fail`` stops the stage); a new source-test item linked to frozen
  train/val items cannot take them along (they are frozen), so it is left out (``fail`` stops).
* New ids in a unit frozen in several splits bridge them: they are left out.
* A unit with no frozen member in a split is assigned whole: a source-provided split wins (test, then val),
  with the policy deciding for the non-test members of a unit that straddles the source's test split; without a
  source split the unit's key (its caller group, else its smallest id) and the seed give a stable draw.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from tasks.core import io
from tasks.core.config import SplitConfig

ORDER = {"train": 0, "val": 1, "test": 2}


def _score(seed: int, key: str) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign(meta: pa.Table, cfg: SplitConfig, units: np.ndarray,
           frozen: dict[str, tuple[str, str | None]] | None = None) -> tuple[pa.Table, list[dict]]:
    """(manifest table, cross-split decisions).  ``frozen``: id -> (split or "excluded", reason)."""
    n = len(meta)
    ids = np.asarray(meta.column("id").to_pylist(), dtype=object)
    labels = meta.column("label").to_pylist()
    groups = meta.column("group").to_pylist()
    src = [s if cfg.honour_source_split else None for s in meta.column("source_split").to_pylist()]
    frozen = frozen or {}
    policy = cfg.cross_split_duplicates

    order = np.argsort(units, kind="stable")
    bounds = np.flatnonzero(np.diff(units[order])) + 1 if n else np.zeros(0, np.int64)
    split = np.empty(n, dtype=object)
    reason = np.full(n, None, dtype=object)
    unit_key = np.empty(n, dtype=object)
    decisions: list[dict] = []
    has_source_test = any(s == "test" for s in src)
    f = cfg.fractions

    def decide(i: int, partner: int, outcome: str, why: str) -> None:
        split[i], reason[i] = outcome, why
        decisions.append({"id": ids[i], "label": labels[i], "source_split": src[i], "split": outcome,
                          "partner_id": ids[partner], "partner_label": labels[partner],
                          "partner_split": split[partner], "reason": why})

    for members in (np.split(order, bounds) if n else []):
        m_groups = sorted({groups[i] for i in members if groups[i]})
        key = f"group:{m_groups[0]}" if len(m_groups) == 1 else min(ids[members])
        unit_key[members] = key
        old = [i for i in members if ids[i] in frozen]
        new = [i for i in members if ids[i] not in frozen]
        for i in old:
            split[i], reason[i] = frozen[ids[i]]
            if src[i] == "test" and split[i] in ("train", "val"):
                # the source now says test (e.g. the same bytes were added under test/): a frozen id never moves,
                # so say that the source's test file stays where it was frozen
                decisions.append({"id": ids[i], "label": labels[i], "source_split": src[i], "split": split[i],
                                  "partner_id": ids[i], "partner_label": labels[i], "partner_split": split[i],
                                  "reason": f"source-test item frozen in {split[i]} (frozen ids never move; "
                                            "re-split with --refreeze to move it)"})
        if not new:
            continue
        placed = sorted({split[i] for i in old if split[i] in ORDER}, key=ORDER.get)
        if len(placed) > 1:
            anchor = next(i for i in old if split[i] == placed[-1])
            for i in new:
                if "test" in placed:  # a test leak the policy must see (fail stops; the others record it)
                    decide(i, anchor, "excluded", f"near duplicate bridging frozen splits {placed}")
                else:
                    split[i], reason[i] = "excluded", f"near duplicate bridging frozen splits {placed}"
            continue
        if len(placed) == 1:
            s = placed[0]
            anchor = next(i for i in old if split[i] == s)
            for i in new:
                if s == "test" and src[i] in ("train", "val"):
                    if policy == "move_to_test":
                        decide(i, anchor, "test", "near duplicate of a frozen test item (moved to test)")
                    else:  # drop_from_train; fail is raised by the stage after the report is written
                        decide(i, anchor, "excluded", "near duplicate of a frozen test item (dropped from train)")
                elif s != "test" and src[i] == "test":
                    decide(i, anchor, "excluded", f"source-test item linked to frozen {s} items, which never "
                                                  "move: left out of test")
                else:
                    split[i], reason[i] = s, f"joins frozen {s} unit"
            continue
        _fresh(new, key, split, src, cfg, has_source_test, f, decide)

    table = pa.table({"id": ids.tolist(), "label": labels, "split": split.tolist(), "unit": unit_key.tolist(),
                      "reason": reason.tolist()}, schema=io.MANIFEST_SCHEMA)
    return table, decisions


def _fresh(members, key, split, src, cfg: SplitConfig, has_source_test: bool, f: dict, decide) -> None:
    """Assign a unit none of whose members is frozen in a split."""
    sides = {src[i] for i in members if src[i]}
    score = _score(cfg.seed, key)
    if "test" in sides and len(sides) > 1:
        test_side = [i for i in members if src[i] == "test"]
        for i in test_side:
            split[i] = "test"
        for i in members:
            if src[i] == "test":
                continue
            if cfg.cross_split_duplicates == "move_to_test":
                decide(i, test_side[0], "test", "near duplicate of a source test item (moved to test)")
            else:  # drop_from_train; "fail" is decided after the report is written
                decide(i, test_side[0], "excluded", "near duplicate of a source test item (dropped from train)")
        return
    if "test" in sides:
        s = "test"
    elif "val" in sides:
        s = "val"
    elif has_source_test and cfg.honour_source_split:
        s = "val" if score < cfg.val_fraction_of_train else "train"
    else:
        s = "train" if score < f["train"] else "val" if score < f["train"] + f["val"] else "test"
    for i in members:
        split[i] = s
