"""The independent check: no id twice, and no link of any kind between two different splits.

It reads only the manifest and the links (not the assignment's reasoning), so a bug in ``assign`` or a
hand-edited manifest is caught before the manifest is written.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.split.links import Links

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
    # groups and identical pixels: every kept item sharing a key must be in one split (their links are a chain,
    # which an excluded item in the middle would break)
    for kind, column in (("group", "group"), ("exact_pixels", "pixel_sha")):
        keys = np.asarray(meta.column(column).to_pylist(), dtype=object)
        valid = kept & np.array([isinstance(k, str) and k != "" for k in keys], dtype=bool)
        idx = np.flatnonzero(valid)
        if idx.size < 2:
            continue
        order = idx[np.argsort(keys[idx].astype(str), kind="stable")]
        k_sorted, s_sorted = keys[order].astype(str), where[order]
        starts = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for a, b in zip(starts, ends):
            if b - a > 1 and len(set(s_sorted[a:b])) > 1:
                members = order[a:b]
                problems.append(f"{KIND_TEXT[kind]} ({column} {k_sorted[a][:16]}): " + ", ".join(
                    f"{uris[m]} ({where[m]}, id {ids[m][:12]}…)" for m in members[:6]))
    for kind in ("near",):
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
