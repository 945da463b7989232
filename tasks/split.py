"""split (freeze): assign every raw item to train/val/test before anything else touches the data.

Leakage units.  Items are joined into one unit when they share a caller-provided group, have identical decoded
pixels (exact duplicates across encodings), or have perceptual hashes within ``near_dup_max_distance`` bits
(near duplicates).  A unit is assigned as a whole, so no group, exact duplicate or near duplicate straddles splits.

Stable assignment.  A unit's split is a pure function of the seed and the unit's key (its caller group, else its
smallest member id): adding items never changes the key, and so never the split, of an untouched unit.  On top of
that the split is frozen: ids already in the previous manifest keep their split, and a new item joining a frozen
unit inherits it.  Changing the seed or fractions of a frozen split is refused; re-splitting is deliberate
(``keel split --refreeze``), because it changes what the test set is.

Source-provided splits are honoured: the source's test set stays the test set and validation is carved from the
source's train set.  When a near-duplicate unit has members on both sides of a source split, the
``cross_split_duplicates`` policy decides (drop the train side, move it to test, or fail) and the leakage report
lists every such item with its partner.  Finally an independent check recomputes the units over the kept items
and fails the stage if any id, exact hash, near-duplicate group or caller group appears in two splits.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.core import dedup, io
from tasks.core.config import Paths, SplitConfig
from tasks.core.errors import UserError

ORDER = {"train": 0, "val": 1, "test": 2}


class LeakageError(UserError):
    """Items of one leakage unit ended up in different splits; the message lists them."""


class FrozenSplitError(UserError):
    """The split parameters differ from those the frozen manifest was made with."""


@dataclass
class SplitResult:
    counts: dict[str, int]
    excluded: int
    manifest_sha256: str
    units: int
    cross_split_items: int


def _score(seed: int, key: str) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _units(meta: pa.Table, k: int) -> tuple[np.ndarray, dict]:
    n = len(meta)
    dup = dedup.duplicate_structure(np.asarray(meta.column("pixel_sha").to_pylist(), dtype=object),
                                    meta.column("phash").to_numpy(), k)
    group_edges = dedup.key_edges(np.asarray(meta.column("group").to_pylist(), dtype=object))
    edges = np.concatenate([dup["exact_edges"], dup["near_edges"], group_edges])
    return dedup.components(n, edges), dup


def _meta_of(cfg: SplitConfig) -> dict:
    return {"seed": cfg.seed, "fractions": dict(cfg.fractions), "val_fraction_of_train": cfg.val_fraction_of_train,
            "honour_source_split": cfg.honour_source_split, "near_dup_max_distance": cfg.near_dup_max_distance,
            "cross_split_duplicates": cfg.cross_split_duplicates}


def assign(meta: pa.Table, cfg: SplitConfig, frozen: dict[str, str] | None = None) -> tuple[pa.Table, dict]:
    """Pure compute: raw metadata (+ frozen id->split) -> (manifest table, leakage report)."""
    n = len(meta)
    ids = np.asarray(meta.column("id").to_pylist(), dtype=object)
    labels = meta.column("label").to_pylist()
    groups = meta.column("group").to_pylist()
    src = [s if cfg.honour_source_split else None for s in meta.column("source_split").to_pylist()]
    comp, dup = _units(meta, cfg.near_dup_max_distance)
    frozen = frozen or {}

    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    split = np.empty(n, dtype=object)
    reason = np.full(n, None, dtype=object)
    unit_key = np.empty(n, dtype=object)
    cross: list[dict] = []
    has_source_test = any(s == "test" for s in src)
    f = cfg.fractions

    for members in np.split(order, bounds):
        m_groups = sorted({groups[i] for i in members if groups[i]})
        key = f"group:{m_groups[0]}" if len(m_groups) == 1 else min(ids[members])
        unit_key[members] = key
        prior = {frozen[ids[i]] for i in members if ids[i] in frozen}
        if len(prior) == 1:
            s = prior.pop()
            split[members] = s
            for i in members:
                if ids[i] not in frozen:
                    reason[i] = f"joins frozen {s} unit"
            continue
        if len(prior) > 1:
            # a new item bridges units frozen in different splits: keep the frozen items, exclude the bridge
            for i in members:
                if ids[i] in frozen:
                    split[i] = frozen[ids[i]]
                else:
                    split[i] = "excluded"
                    reason[i] = f"near-duplicate bridging frozen splits {sorted(prior)}"
            continue
        sides = {src[i] for i in members if src[i]}
        score = _score(cfg.seed, key)
        if "test" in sides and len(sides) > 1:
            test_side = [i for i in members if src[i] == "test"]
            other = [i for i in members if src[i] != "test"]
            for i in other:
                cross.append({"id": ids[i], "label": labels[i], "source_split": src[i],
                              "partner_id": ids[test_side[0]], "partner_label": labels[test_side[0]]})
            split[test_side] = "test"
            if cfg.cross_split_duplicates == "drop_from_train":
                split[other] = "excluded"
                reason[other] = "near-duplicate of a source test item (dropped from train)"
            else:  # move_to_test; "fail" is decided after the report is written
                split[other] = "test"
                reason[other] = "near-duplicate of a source test item (moved to test)"
        elif "test" in sides:
            split[members] = "test"
        elif "val" in sides:
            split[members] = "val"
        elif has_source_test and cfg.honour_source_split:
            split[members] = "val" if score < cfg.val_fraction_of_train else "train"
        else:
            split[members] = "train" if score < f["train"] else "val" if score < f["train"] + f["val"] else "test"

    table = pa.table({"id": ids.tolist(), "label": labels, "split": split.tolist(), "unit": unit_key.tolist(),
                      "reason": reason.tolist()}, schema=io.MANIFEST_SCHEMA)
    report = {
        "units": int(comp.max() + 1) if n else 0,
        "exact_duplicate_links": len(dup["exact_edges"]),
        "near_duplicate_links": len(dup["near_edges"]),
        "source_split_honoured": bool(has_source_test and cfg.honour_source_split),
        "cross_split_policy": cfg.cross_split_duplicates,
        "cross_split_items": cross,
        "frozen_ids_kept": int(sum(1 for i in ids if i in frozen)),
    }
    return table, report


def check_leakage(manifest: pa.Table, meta: pa.Table, k: int) -> list[str]:
    """Independent check: recompute units over the kept items; return one readable line per violation."""
    splits = dict(zip(manifest.column("id").to_pylist(), manifest.column("split").to_pylist()))
    problems: list[str] = []
    mids = manifest.column("id").to_pylist()
    if len(mids) != len(set(mids)):
        seen, dups = set(), set()
        for i in mids:
            (dups if i in seen else seen).add(i)
        problems += [f"id {i[:16]}… appears more than once in the manifest" for i in sorted(dups)[:20]]
    ids = meta.column("id").to_pylist()
    keep = np.array([splits.get(i) in ORDER for i in ids])
    kept = meta.filter(pa.array(keep))
    kept_ids = kept.column("id").to_pylist()
    kept_split = np.array([splits[i] for i in kept_ids], dtype=object)
    uris = kept.column("source_uri").to_pylist()
    dup = dedup.duplicate_structure(np.asarray(kept.column("pixel_sha").to_pylist(), dtype=object),
                                    kept.column("phash").to_numpy(), k)
    kinds = [("exact duplicate (same pixels)", dup["exact_edges"]),
             ("near duplicate (pHash)", dup["near_edges"]),
             ("same group", dedup.key_edges(np.asarray(kept.column("group").to_pylist(), dtype=object)))]
    comp = dedup.components(len(kept), np.concatenate([e for _, e in kinds]))
    bad_units: set[int] = set()
    if len(kept):  # vectorised: a unit is bad when its min and max split codes differ (O(n), not O(n x units))
        codes = np.unique(kept_split.astype(str), return_inverse=True)[1]
        lo = np.full(comp.max() + 1, codes.max() + 1)
        hi = np.full(comp.max() + 1, -1)
        np.minimum.at(lo, comp, codes)
        np.maximum.at(hi, comp, codes)
        bad_units = set(np.flatnonzero(lo != hi).tolist())
    for kind, edges in kinds:
        for a, b in edges:
            if kept_split[a] != kept_split[b]:
                problems.append(f"{kind}: {uris[a]} ({kept_split[a]}, id {kept_ids[a][:12]}…) ~ "
                                f"{uris[b]} ({kept_split[b]}, id {kept_ids[b][:12]}…)")
    if bad_units and not problems:  # connected only through a chain: report the unit
        problems += [f"unit {c} spans splits {sorted(set(kept_split[comp == c]))}" for c in sorted(bad_units)[:20]]
    return problems


def run(cfg: SplitConfig, paths: Paths, refreeze: bool = False) -> SplitResult:
    meta = io.read_raw_meta(paths.raw_items)
    manifest_path = Path(paths.split_manifest)
    frozen: dict[str, str] = {}
    if cfg.freeze and manifest_path.exists() and not refreeze:
        prev, prev_meta = io.read_manifest(manifest_path)
        changed = {k: (prev_meta.get(k), v) for k, v in _meta_of(cfg).items()
                   if k in prev_meta and prev_meta[k] != v}
        if changed:
            diff = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
            raise FrozenSplitError(
                f"{manifest_path}: the split is frozen and split parameters changed ({diff}). Re-splitting changes "
                "what the test set is; if that is intended, run `keel split --refreeze` (or delete the manifest) "
                "and treat every earlier test result as void.")
        frozen = {i: s for i, s in zip(prev.column("id").to_pylist(), prev.column("split").to_pylist())
                  if s in ORDER}

    table, report = assign(meta, cfg, frozen)
    problems = check_leakage(table, meta, cfg.near_dup_max_distance)
    counts = {s: int(sum(1 for x in table.column("split").to_pylist() if x == s)) for s in (*ORDER, "excluded")}
    report.update({"counts": counts, "problems": problems, "passed": not problems})
    fail_policy = cfg.cross_split_duplicates == "fail" and report["cross_split_items"]
    report["passed"] = report["passed"] and not fail_policy
    io.write_json(paths.leakage_report, report)
    if fail_policy:
        items = report["cross_split_items"]
        lines = [f"  {c['id'][:16]}… ({c['source_split']}, {c['label']}) ~ test {c['partner_id'][:16]}… "
                 f"({c['partner_label']})" for c in items[:10]]
        raise LeakageError(
            f"{len(items)} source-train item(s) are near duplicates of source-test items and "
            f"split.cross_split_duplicates=fail:\n" + "\n".join(lines)
            + f"\nsee {paths.leakage_report}; set cross_split_duplicates to drop_from_train or move_to_test")
    if problems:
        raise LeakageError(f"leakage check failed: {len(problems)} cross-split link(s):\n  "
                           + "\n  ".join(problems[:10]) + f"\nsee {paths.leakage_report}")
    digest = io.write_manifest(manifest_path, table, _meta_of(cfg))
    print(f"split: train {counts['train']}, val {counts['val']}, test {counts['test']}, excluded {counts['excluded']} "
          f"({report['units']} leakage units; {len(report['cross_split_items'])} cross-split near duplicates handled "
          f"by {cfg.cross_split_duplicates}); manifest sha256 {digest[:12]}…")
    return SplitResult({k: counts[k] for k in ORDER}, counts["excluded"], digest, report["units"],
                       len(report["cross_split_items"]))
