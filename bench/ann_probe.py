"""Which faiss index for split's candidate search: cost per item and recall at 60k and 600k 64-d descriptors.

    python bench/ann_probe.py [--sizes 60000,600000]

Random unit vectors (no structure: the worst case) with 2,000 planted pairs at cosine about 0.84 (the weakest
planted near duplicates of bench/leakage.py, 2 px shifts and crops, sit at 0.82-0.92). Each index is built on all
vectors and every vector looks up its 6 nearest; recall = planted partners found. Figures: bench/RESULTS.md.
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
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    for n in map(int, a.sizes.split(",")):
        x, src, dst = planted(n, rng)
        configs = {"HNSW M16 efC40 efS32": lambda: _hnsw(16, 40, 32), "HNSW M32 efC64 efS64": lambda: _hnsw(32, 64, 64),
                   "IVF n/512 lists, HNSW quantiser, nprobe 4": lambda n=n, x=x: _ivf(n, x, rng)}
        for name, make in configs.items():
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
