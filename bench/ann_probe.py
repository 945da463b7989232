"""Which faiss index for split's candidate search: cost per item and recall at 60k and 600k 64-d descriptors.

    python bench/ann_probe.py [--sizes 60000,600000] [--configs keel,m16,...]

Random unit vectors (no structure: the worst case) with 2,000 planted pairs at cosine about 0.84 (the weakest
planted near duplicates of bench/leakage.py, 2 px shifts and crops, sit at 0.82-0.92). Each index is built on all
vectors and every vector looks up its 6 nearest; recall = planted partners found. ``keel`` is what split runs
above EXACT_SEARCH_MAX items (tasks.core.neardup.candidates: HNSW on the principal directions, both lookups,
the full-descriptor similarity re-checked); its recall on random vectors is a floor (random vectors spread
their energy over all 64 directions, image descriptors over few). Figures: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def planted(n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, 2000, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 2000, replace=False)
    x[dst] = x[src] + 0.08 * rng.standard_normal((2000, 64)).astype(np.float32)
    x[dst] /= np.linalg.norm(x[dst], axis=1, keepdims=True)
    return x, src, dst


def main() -> int:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="60000,600000")
    ap.add_argument("--configs", default="keel,m16,m32,ivf")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    for n in map(int, a.sizes.split(",")):
        x, src, dst = planted(n, rng)
        if "keel" in a.configs.split(","):
            _keel(x, src, dst)
        configs = {"m16": ("HNSW M16 efC40 efS32", lambda: _hnsw(16, 40, 32)),
                   "m32": ("HNSW M32 efC64 efS64", lambda: _hnsw(32, 64, 64)),
                   "ivf": ("IVF n/512 lists, HNSW quantiser, nprobe 4", lambda n=n, x=x: _ivf(n, x, rng))}
        for key, (name, make) in configs.items():
            if key not in a.configs.split(","):
                continue
            t0 = time.perf_counter()
            index = make()
            index.add(x)
            t1 = time.perf_counter()
            _, nb = index.search(x, 6)
            t2 = time.perf_counter()
            recall = float(np.mean([(nb[s] == d).any() for s, d in zip(src, dst)]))
            print(f"n {n:,}  {name}: build {t1 - t0:.1f} s, search {t2 - t1:.1f} s, "
                  f"{(t2 - t0) / n * 1e6:.0f} us/item, recall {recall:.3f}", flush=True)
    return 0


def _keel(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """split's own candidate search, timed as split runs it (index, two lookups, re-check, dedup)."""
    from tasks.core import neardup

    t0 = time.perf_counter()
    pairs, stats = neardup.candidates(x, 5, -1.0)
    dt = time.perf_counter() - t0
    found = {(int(i), int(j)) for i, j, _ in pairs}
    recall = float(np.mean([(min(s, d), max(s, d)) in found for s, d in zip(src, dst)]))
    print(f"n {len(x):,}  keel ({stats['index']}): {dt:.1f} s, {dt / len(x) * 1e6:.0f} us/item, "
          f"recall {recall:.3f}", flush=True)


def _hnsw(m: int, efc: int, efs: int):
    import faiss

    index = faiss.IndexHNSWFlat(64, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction, index.hnsw.efSearch = efc, efs
    return index


def _ivf(n: int, x: np.ndarray, rng):
    import faiss

    nlist = max(1, n // 512)
    index = faiss.IndexIVFFlat(faiss.IndexHNSWFlat(64, 16, faiss.METRIC_INNER_PRODUCT), 64, nlist,
                               faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.train(x[rng.choice(n, min(n, 40 * nlist, 100_000), replace=False)])
    index.nprobe = 4
    return index


if __name__ == "__main__":
    raise SystemExit(main())
