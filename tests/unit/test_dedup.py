import numpy as np

from tasks.core import dedup


def _brute(h, k):
    out = set()
    for i in range(len(h)):
        d = np.bitwise_count(h[i] ^ h[i + 1:])
        for j in np.nonzero(d <= k)[0]:
            out.add((i, i + 1 + int(j)))
    return out


def test_multi_index_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=400, dtype=np.int64).astype(np.uint64)
    # plant near duplicates at distances 1..6
    planted = []
    for d in range(1, 7):
        for src in rng.choice(400, 10, replace=False):
            bits = rng.choice(64, d, replace=False)
            v = base[src]
            for b in bits:
                v ^= np.uint64(1) << np.uint64(int(b))
            planted.append(v)
    h = np.unique(np.concatenate([base, np.array(planted, np.uint64)]))
    for k in (0, 2, 4, 6):
        got = {tuple(p) for p in dedup.near_pairs_unique(h, k).tolist()}
        assert got == _brute(h, k), k
    assert len(_brute(h, 4)) >= 30  # the planted pairs are really found, not just an empty match


def test_identical_hashes_are_grouped_in_linear_edges():
    h = np.array([5] * 1000 + [0xFFFFFFFFFFFFFFF0], dtype=np.uint64)
    s = dedup.duplicate_structure(np.array([f"p{i}" for i in range(1001)], dtype=object), h, 4)
    assert len(s["near_edges"]) == 999  # a chain, not 1000*999/2 pairs
    comp = dedup.components(1001, s["near_edges"])
    assert len(set(comp[:1000])) == 1 and comp[1000] != comp[0]


def test_key_edges_ignore_missing_keys():
    e = dedup.key_edges(np.array(["a", None, "a", "", "b", "b"], dtype=object))
    assert sorted(map(tuple, e.tolist())) == [(0, 2), (4, 5)]
