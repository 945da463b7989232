"""``run``: read the raw items, link, assign, check, write the report and picture, then the manifest."""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core import io, neardup, progress
from tasks.core.config import Paths, SplitConfig
from tasks.core.errors import UserError
from tasks.split import links as links_mod
from tasks.split import report as report_mod
from tasks.split.assign import ORDER, assign
from tasks.split.check import check

# a frozen split refuses a change of these (they decide which split an item lands in); detector settings may
# change: frozen ids keep their split anyway, and a leak the new settings reveal fails the check, by name
REFUSE_CHANGE = ("seed", "fractions", "val_fraction_of_train", "honour_source_split", "cross_split_duplicates")


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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def meta_of(cfg: SplitConfig) -> dict:
    return {"seed": cfg.seed, "fractions": dict(cfg.fractions), "val_fraction_of_train": cfg.val_fraction_of_train,
            "honour_source_split": cfg.honour_source_split, "cross_split_duplicates": cfg.cross_split_duplicates,
            "near_duplicates": cfg.near_duplicates.model_dump()}


def params_of(cfg: SplitConfig) -> neardup.Params:
    return neardup.Params(**cfg.near_duplicates.model_dump(exclude={"min_side", "phash_max_distance"}))


def _frozen(cfg: SplitConfig, manifest_path: Path, refreeze: bool) -> dict[str, tuple[str, str | None]]:
    if not (cfg.freeze and manifest_path.exists() and not refreeze):
        return {}
    prev, prev_meta = io.read_manifest(manifest_path)
    changed = {k: (prev_meta.get(k), v) for k, v in meta_of(cfg).items()
               if k in REFUSE_CHANGE and k in prev_meta and prev_meta[k] != v}
    if changed:
        diff = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise FrozenSplitError(
            f"{manifest_path}: the split is frozen and split parameters changed ({diff}). Re-splitting changes "
            "what the test set is; if that is intended, run `keel split --refreeze` (or delete the manifest) "
            "and treat every earlier test result as void.")
    return {i: (s, r) for i, s, r in zip(prev.column("id").to_pylist(), prev.column("split").to_pylist(),
                                          prev.column("reason").to_pylist())}


def run(cfg: SplitConfig, paths: Paths, refreeze: bool = False) -> SplitResult:
    t0 = time.perf_counter()
    meta = io.read_raw_meta(paths.raw_items)
    thumbs = io.read_raw_thumbs(paths.raw_items)
    manifest_path = Path(paths.split_manifest)
    frozen = _frozen(cfg, manifest_path, refreeze)
    rejects = pq.read_table(paths.rejects) if Path(paths.rejects).exists() else None

    found = links_mod.find(meta, thumbs, params_of(cfg), cfg.near_duplicates.min_side,
                           cfg.near_duplicates.phash_max_distance, log=_log)
    units = found.units()
    table, decisions = assign(meta, cfg, units, frozen)
    problems = check(table, meta, found)
    pairs = report_mod.pairs(meta, table, found, rejects)
    cross_exact = [p for p in pairs if p["check"] == "exact_bytes" and p["cross_source_split"]]
    split_col = table.column("split").to_pylist()
    counts = {s: split_col.count(s) for s in (*ORDER, "excluded")}
    fail_items = decisions + cross_exact if cfg.cross_split_duplicates == "fail" else []
    uris = dict(zip(meta.column("id").to_pylist(), meta.column("source_uri").to_pylist()))
    for d in decisions:
        d["uri"], d["partner_uri"] = uris.get(d["id"]), uris.get(d["partner_id"])
    report = {
        "passed": not problems and not fail_items,
        "counts": counts,
        "units": int(units.max() + 1) if len(units) else 0,
        "links": {"group": len(found.group), "exact_pixels": len(found.exact_pixels), "near": len(found.near),
                  "exact_bytes_cross_split": len(cross_exact)},
        "source_split_honoured": bool(cfg.honour_source_split and "test" in set(meta.column("source_split")
                                                                                 .to_pylist())),
        "cross_split_policy": cfg.cross_split_duplicates,
        "cross_split_items": decisions,
        "frozen_ids_kept": sum(1 for i in meta.column("id").to_pylist() if i in frozen),
        "problems": problems,
        "near_duplicate_search": found.stats,
        "pairs": pairs,
        "picture": str(paths.leakage_picture),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    io.write_json(paths.leakage_report, report)
    shown = sorted([p for p in pairs if p["cross_source_split"]], key=lambda p: p["score"] or 0)[:report_mod.PICTURE_PAIRS]
    title = (f"{len([p for p in pairs if p['cross_source_split']])} cross-split links (least certain first)"
             if shown else "no cross-split links; links inside one source split (least certain first)")
    if not shown:
        shown = pairs[:report_mod.PICTURE_PAIRS]
    report_mod.picture(paths.leakage_picture, paths.raw_items, shown, title)
    if fail_items:
        lines = [f"  {d.get('uri') or d['b']['uri']} ({d.get('source_split') or d['b']['source_split']}) ~ "
                 f"{d.get('partner_uri') or d['a']['uri']}" for d in fail_items[:10]]
        raise LeakageError(
            f"{len(fail_items)} item(s) are duplicates across the source's splits and "
            f"split.cross_split_duplicates=fail:\n" + "\n".join(lines)
            + f"\nsee {paths.leakage_report} and {paths.leakage_picture}; set cross_split_duplicates to "
              "drop_from_train or move_to_test, or remove the copies from the source")
    if problems:
        hint = ("\nthe linked items are in the frozen manifest (frozen ids never move): if the links are real, "
                "re-split with `keel split --refreeze` and treat earlier test results as void"
                if frozen else "")
        raise LeakageError(f"leakage check failed: {len(problems)} cross-split link(s):\n  "
                           + "\n  ".join(problems[:10]) + f"\nsee {paths.leakage_report}" + hint)
    digest = io.write_manifest(manifest_path, table, meta_of(cfg))
    print(f"split: train {counts['train']}, val {counts['val']}, test {counts['test']}, excluded {counts['excluded']} "
          f"({report['units']} leakage units; {len(found.near)} near-duplicate and {len(found.exact_pixels)} "
          f"identical-pixel links; {len(decisions)} cross-split items handled by {cfg.cross_split_duplicates}, "
          f"{len(cross_exact)} byte-identical cross-split copies folded at ingest); manifest sha256 {digest[:12]}…; "
          f"see {paths.leakage_report} and {paths.leakage_picture}")
    excluded = Counter(r for sp, r in zip(split_col, table.column("reason").to_pylist()) if sp == "excluded")
    progress.summary("split", len(meta), excluded, time.perf_counter() - t0, rejects_word="excluded")
    return SplitResult({k: counts[k] for k in ORDER}, counts["excluded"], digest, report["units"], len(decisions))
