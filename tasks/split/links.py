"""What joins items into one leakage unit: caller groups, identical pixels, verified near duplicates.

``find`` computes every link once; the assignment (``assign``) and the independent check (``check``) both read
the same ``Links``, so the check audits the manifest against what was found without paying for a second search.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from tasks.core import dedup, neardup


@dataclass
class Links:
    """Edges [E, 2] over the n raw items, by kind; near duplicates carry their scores and alignment."""
    n: int
    group: np.ndarray
    exact_pixels: np.ndarray
    near: np.ndarray
    near_ncc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    near_detail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    near_transform: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def edges(self) -> np.ndarray:
        return np.concatenate([self.group, self.exact_pixels, self.near]).astype(np.int64).reshape(-1, 2)

    def units(self) -> np.ndarray:
        return dedup.components(self.n, self.edges())


def find(meta: pa.Table, thumbs: np.ndarray | None, params: neardup.Params, min_side: int = 16,
         phash_max_distance: int = 4, log=None) -> Links:
    """All links among the items of ``meta``; ``thumbs`` [N, 32, 32] (None: no near-duplicate search).

    Images with a side under ``min_side`` pixels are too small for the aligned search: upsampled to the
    thumbnail they are all smooth blobs (8x8 digits by different writers correlate like copies).  They keep the
    perceptual-hash check (Hamming distance <= ``phash_max_distance``), which does not see flips or shifts; the
    count is in the stats.
    """
    n = len(meta)
    group = dedup.key_edges(np.asarray(meta.column("group").to_pylist(), dtype=object))
    exact = dedup.key_edges(np.asarray(meta.column("pixel_sha").to_pylist(), dtype=object))
    if thumbs is None or n < 2:
        return Links(n, group, exact, np.zeros((0, 2), np.int64), stats={"near_duplicate_search": "off"})
    side = np.minimum(meta.column("width").to_numpy(), meta.column("height").to_numpy())
    big = np.flatnonzero(side >= min_side)
    small = np.flatnonzero(side < min_side)
    found = neardup.near_duplicates(thumbs[big], params, log=log)
    pairs = big[found.pairs] if len(found.pairs) else found.pairs.reshape(0, 2)
    ncc, detail, transform = found.ncc, found.detail, list(found.transform)
    if small.size > 1:
        ph = meta.column("phash").to_numpy()[small].astype(np.uint64)
        sp = dedup.duplicate_structure(np.full(small.size, None, dtype=object), ph, phash_max_distance)["near_edges"]
        if len(sp):
            dist = np.bitwise_count(ph[sp[:, 0]] ^ ph[sp[:, 1]])
            pairs = np.concatenate([pairs, small[sp]])
            ncc = np.concatenate([ncc, np.full(len(sp), np.nan, np.float32)])
            detail = np.concatenate([detail, np.full(len(sp), np.nan, np.float32)])
            transform += [f"pHash distance {int(d)} (under {min_side} px)" for d in dist]
    found.stats.update(small_items=int(small.size), min_side=min_side, small_item_check=(
        f"pHash Hamming distance <= {phash_max_distance}"))
    return Links(n, group, exact, pairs.astype(np.int64), ncc, detail, transform, found.stats)
