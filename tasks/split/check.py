"""The independent check: no id twice, and no link of any kind between two different splits.

It reads only the manifest and the links (not the assignment's reasoning), so a bug in ``assign`` or a
hand-edited manifest is caught before the manifest is written.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.split.links import KINDS, Links

KIND_TEXT = {"group": "same group", "exact_pixels": "exact duplicate (same pixels)",
             "near": "near duplicate (verified)"}
SPLITS = ("train", "val", "test")


def check(manifest: pa.Table, meta: pa.Table, links: Links) -> list[str]:
    """One readable line per violation (file paths, splits, short ids)."""
    problems: list[str] = []
    mids = manifest.column("id").to_pylist()
    if len(mids) != len(set(mids)):
        seen, dups = set(), set()
        for i in mids:
            (dups if i in seen else seen).add(i)
        problems += [f"id {i[:16]}… appears more than once in the manifest" for i in sorted(dups)[:20]]
    splits = dict(zip(mids, manifest.column("split").to_pylist()))
    ids = meta.column("id").to_pylist()
    uris = meta.column("source_uri").to_pylist()
    where = np.array([splits.get(i, "missing") for i in ids], dtype=object)
    missing = [uris[k] for k in np.flatnonzero(where == "missing")[:20]]
    problems += [f"{u}: raw item has no row in the manifest" for u in missing]
    kept = np.isin(where, SPLITS)
    for kind in KINDS:
        edges = getattr(links, kind)
        if not len(edges):
            continue
        a, b = edges[:, 0], edges[:, 1]
        bad = kept[a] & kept[b] & (where[a] != where[b])
        for x, y in edges[bad][:50]:
            problems.append(f"{KIND_TEXT[kind]}: {uris[x]} ({where[x]}, id {ids[x][:12]}…) ~ "
                            f"{uris[y]} ({where[y]}, id {ids[y][:12]}…)")
    # a chain through excluded items is not a leak: only direct links between kept items are
    return problems
