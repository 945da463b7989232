"""Exact and near-duplicate grouping that scales to 600k+ items (no all-pairs comparison).

Near duplicates are items whose 64-bit perceptual hashes differ in at most ``k`` bits.  By the pigeonhole
principle, two hashes within distance ``k`` agree exactly on at least one of ``k + 1`` disjoint bands of bits
(multi-index hashing, Norouzi et al. 2012), so candidates are only pairs that share a band value; each candidate
is then checked with a popcount.  Identical hashes are collapsed first, so a pile of identical images (blank
frames, a duplicated folder) costs O(n), not O(n^2).
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def _bands(k: int) -> list[tuple[int, int]]:
    m = k + 1
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    out, off = [], 0
    for w in widths:
        out.append((off, w))
        off += w
    return out


def near_pairs_unique(hashes: np.ndarray, k: int) -> np.ndarray:
    """Pairs (i, j), i < j, of *distinct* uint64 hashes within Hamming distance ``k``: int64 array [P, 2]."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2 or k < 0:
        return np.zeros((0, 2), np.int64)
    found: list[np.ndarray] = []
    for off, width in _bands(k):
        key = (hashes >> np.uint64(off)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        # Walk the sorted keys at growing shifts; indices leave the active set once their run has ended.
        active = np.arange(n - 1)
        shift = 1
        while active.size:
            j = active + shift
            ok = j < n
            active, j = active[ok], j[ok]
            same = sk[active] == sk[j]
            active, j = active[same], j[same]
            if active.size:
                a, b = order[active], order[j]
                dist = np.bitwise_count(hashes[a] ^ hashes[b])
                close = dist <= k
                if close.any():
                    pa_, pb = a[close], b[close]
                    found.append(np.stack([np.minimum(pa_, pb), np.maximum(pa_, pb)], axis=1))
            shift += 1
    if not found:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    return np.unique(pairs, axis=0)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label per node for an undirected edge list [E, 2] over nodes 0..n-1."""
    if n == 0:
        return np.zeros(0, np.int64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    g = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(g, directed=False)
    return labels.astype(np.int64)


def key_edges(keys: np.ndarray) -> np.ndarray:
    """Chain edges joining items that share a key (None/'' keys join nothing): O(n log n), not O(group^2)."""
    keys = np.asarray(keys, dtype=object)
    valid = np.array([isinstance(k, str) and k != "" for k in keys], dtype=bool)
    idx = np.nonzero(valid)[0]
    if idx.size < 2:
        return np.zeros((0, 2), np.int64)
    vals = keys[idx].astype(str)
    order = np.argsort(vals, kind="stable")
    sv, si = vals[order], idx[order]
    same = sv[1:] == sv[:-1]
    return np.stack([si[:-1][same], si[1:][same]], axis=1).astype(np.int64)


def duplicate_structure(pixel_sha: np.ndarray, phash: np.ndarray, k: int) -> dict:
    """Everything split/audit need about duplicates of n items.

    Returns ``exact_edges`` (same decoded pixels), ``near_edges`` (pHash within k, identical pHash included),
    ``phash_inverse`` (item -> unique-hash index) and ``unique_pairs`` (pairs of distinct hashes within k).
    """
    phash = np.asarray(phash, dtype=np.uint64)
    uniq, inverse = np.unique(phash, return_inverse=True)
    unique_pairs = near_pairs_unique(uniq, k)
    same_hash = key_edges(inverse.astype(str).astype(object))
    # one representative item per unique hash links distinct-hash pairs back to items
    rep = np.full(len(uniq), -1, np.int64)
    rep[inverse[::-1]] = np.arange(len(phash))[::-1]
    near = np.concatenate([same_hash, rep[unique_pairs].reshape(-1, 2)]) if len(unique_pairs) else same_hash
    return {
        "exact_edges": key_edges(np.asarray(pixel_sha, dtype=object)),
        "near_edges": near,
        "phash_inverse": inverse,
        "unique_pairs": unique_pairs,
    }
