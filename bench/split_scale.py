"""Split's cost per item at two sizes of the same raw items, in one run: does the near-duplicate search stay flat?

    python bench/split_scale.py --raw /tmp/keel-bench/run-synthetic-600000/raw/items --small-parts 3

The raw items come from ``bench/data_stages.py --dataset synthetic --n 600000 --stages ingest --keep`` (random 8x8
colour blocks: no near duplicates, so this measures the search itself, the worst case for an ANN index: 64-d
descriptors with no low-dimensional structure).  The small size is the first ``--small-parts`` parts of the same
directory (ingest shuffles items across parts, so it is a random sample).  Each size runs ``tasks.split.run`` with
the default SplitConfig in a fresh directory, measured with data_stages' ``measure`` (wall, CPU, peak RSS).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_stages import git_info, machine_info, measure, versions


def run_size(parts: list[Path], work: Path) -> dict:
    from tasks import split
    from tasks.core.config import Paths, SplitConfig

    raw = work / "raw" / "items"
    raw.mkdir(parents=True)
    for p in parts:
        (raw / p.name).symlink_to(p)
    paths = Paths(raw_items=str(raw), rejects=str(work / "raw" / "rejects.parquet"),
                  split_manifest=str(work / "split" / "manifest.parquet"),
                  leakage_report=str(work / "leakage.json"), leakage_picture=str(work / "leakage.png"))
    stats, _result = measure(lambda: split.run(SplitConfig(), paths), lambda r: sum(r.counts.values()) + r.excluded)
    stats["near_duplicate_search"] = json.loads(Path(paths.leakage_report).read_text())["near_duplicate_search"]
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, required=True)
    ap.add_argument("--small-parts", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    parts = sorted(a.raw.glob("part-*.parquet"))
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "git": git_info(),
                 "versions": versions(("numpy", "pyarrow", "faiss-cpu", "scipy")), "sizes": {}}
    for name, sel in (("small", parts[:a.small_parts]), ("large", parts)):
        work = Path(tempfile.mkdtemp(prefix=f"split-scale-{name}-"))
        try:
            print(f"split_scale: {name}: {len(sel)} parts ...", file=sys.stderr, flush=True)
            out["sizes"][name] = run_size(sel, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    s, lg = out["sizes"]["small"], out["sizes"]["large"]
    for name, r in out["sizes"].items():
        print(f"{name}: {r.get('items'):,} items, {r.get('wall_s')} s, {r.get('us_per_item')} us/item wall, "
              f"{r.get('cpu_us_per_item')} us/item CPU, peak RSS {r.get('peak_rss_self_mb')} MB, other processes "
              f"{r.get('other_processes_cores')} cores; search {r['near_duplicate_search'].get('index')}, "
              f"{r['near_duplicate_search'].get('candidate_pairs')} candidates")
    if s.get("us_per_item") and lg.get("us_per_item"):
        out["per_item_ratio_wall"] = round(lg["us_per_item"] / s["us_per_item"], 3)
        out["per_item_ratio_cpu"] = round(lg["cpu_us_per_item"] / s["cpu_us_per_item"], 3)
        print(f"per-item cost, large / small: wall {out['per_item_ratio_wall']}x, CPU {out['per_item_ratio_cpu']}x")
    dest = a.out or Path(__file__).parent / "out" / f"split_scale-{out['date']}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, default=str))
    print(f"split_scale: wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
