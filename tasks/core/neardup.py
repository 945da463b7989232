"""Near duplicates that survive a flip, a small shift or crop, a re-encode and a change of light.

A perceptual hash of the whole frame changes when the frame moves: one pixel of translation, a two-pixel crop or
a horizontal flip puts a copy as far from its original as an unrelated image.  Here a pair is found in two steps,
each measured on CIFAR-10 (bench/leakage.py, bench/RESULTS.md):

1. **Candidates** (cheap, recall first).  Every item has a 32x32 grey thumbnail, made at ingest
   (``thumbnail``).  Its descriptor is the thumbnail blurred (Gaussian, sigma 1 px) and averaged into 8x8 cells,
   minus its mean, scaled to unit length: 64 numbers that a shift of a few pixels, a crop or a change of
   brightness/contrast barely moves.  A flipped image's descriptor is the descriptor's columns reversed, so each
   item is looked up twice, as it is and mirrored, among its ``neighbours`` nearest items by cosine similarity
   (faiss: exact inner product up to ``EXACT_SEARCH_MAX`` items; above, an HNSW graph on the descriptors'
   ``INDEX_DIMS`` principal directions, so the cost per item grows with log N, not N, and the full 64-d
   similarity of what it finds is what the floor is applied to).
2. **Verification** (precise).  Each candidate pair is aligned: both flips, shifts up to ``max_shift`` pixels,
   zoom of either side by 32/30 and 32/28 (a 1 or 2 px crop on each side, resized back).  First on 16x16
   thumbnails to drop the obvious non-matches, then at 32x32 on the best flip.  A pair is a near duplicate when
   at its best alignment both normalised cross-correlations pass: ``min_ncc`` on the lightly blurred image
   (shape and light) and ``min_detail`` on a band-pass (difference of Gaussians) image, which removes the smooth
   gradients that make two different photos of sky or road correlate.  What depends on one image only (its
   blur, 16x16 views, window variances, unit windows) is computed once per item, not once per pair it is in.
   That step, and the separable filters both steps use, are ``tasks.core.align``.

Flat thumbnails (standard deviation under ``FLAT_STD`` grey levels: blank frames) carry no shape to compare; they
are not linked here (exact pixel hashes still join identical ones) and are counted in the stats.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tasks.core import align, progress
from tasks.core.align import verify  # noqa: F401 - the verification step, also used on its own (tests, bench)

THUMB = align.SIDE      # thumbnail side (pixels)
EXACT_SEARCH_MAX = 20_000
INDEX_DIMS = 32         # principal directions the HNSW graph is built on (above EXACT_SEARCH_MAX items)
FLAT_STD = 2.0


@dataclass(frozen=True)
class Params:
    neighbours: int = 5
    min_candidate_similarity: float = 0.75
    max_shift: int = 3
    min_coarse: float = 0.85
    min_ncc: float = 0.96
    min_detail: float = 0.9


@dataclass
class Found:
    """Verified near-duplicate pairs (i < j) with their scores and the alignment that matched."""
    pairs: np.ndarray                     # int64 [P, 2]
    ncc: np.ndarray                       # float32 [P]
    detail: np.ndarray                    # float32 [P]
    transform: list[str]                  # e.g. "flip, shift (1, 0), zoom b x1.14"
    stats: dict = field(default_factory=dict)


def thumbnail(gray: np.ndarray) -> bytes:
    """The 32x32 grey thumbnail (1,024 bytes) of a normalised grey image: box filter down, bilinear up."""
    img = Image.fromarray(np.ascontiguousarray(gray))
    if img.size != (THUMB, THUMB):
        down = img.width >= THUMB and img.height >= THUMB
        img = img.resize((THUMB, THUMB), Image.Resampling.BOX if down else Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).tobytes()


def thumbs_array(column: list[bytes]) -> np.ndarray:
    """uint8 [N, 32, 32] from the raw table's ``thumb`` column."""
    if not column:
        return np.zeros((0, THUMB, THUMB), np.uint8)
    return np.frombuffer(b"".join(column), dtype=np.uint8).reshape(-1, THUMB, THUMB)


def descriptors(thumbs: np.ndarray, batch: int = 8192) -> np.ndarray:
    """float32 [N, 64]: blurred 8x8 cell means, zero mean, unit length (zeros for flat thumbnails)."""
    n = len(thumbs)
    out = np.zeros((n, 64), np.float32)
    for s in range(0, n, batch):
        d = align.cell_blur(thumbs[s:s + batch], 1.0, 8).reshape(-1, 64)
        d -= d.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        # a flat thumbnail leaves only float rounding after the mean is removed (norm ~1e-4): call that zero
        out[s:s + batch] = np.where(norm > 1e-2, d / np.maximum(norm, 1e-2), 0.0)
    return out


def mirrored(desc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(desc.reshape(-1, 8, 8)[:, :, ::-1].reshape(len(desc), 64))


def _principal_directions(desc: np.ndarray, mirror: np.ndarray, dims: int, batch: int = 65536) -> np.ndarray:
    """float32 [64, dims]: the top eigenvectors of the descriptors' (and their mirrors') second-moment matrix,
    accumulated in batches in float64; uncentred, so inner products are what the projection keeps."""
    m = np.zeros((64, 64))
    for s in range(0, len(desc), batch):
        d, r = desc[s:s + batch].astype(np.float64), mirror[s:s + batch].astype(np.float64)
        m += d.T @ d + r.T @ r
    _, vecs = np.linalg.eigh(m)
    return np.ascontiguousarray(vecs[:, ::-1][:, :dims], dtype=np.float32)


def _project(x: np.ndarray, basis: np.ndarray, batch: int = 65536) -> np.ndarray:
    out = np.empty((len(x), basis.shape[1]), np.float32)
    for s in range(0, len(x), batch):
        out[s:s + batch] = x[s:s + batch] @ basis
    return out


def _rowdot(q: np.ndarray, d: np.ndarray, a: np.ndarray, b: np.ndarray, batch: int = 262144) -> np.ndarray:
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), batch):
        out[s:s + batch] = np.einsum("ij,ij->i", q[a[s:s + batch]], d[b[s:s + batch]])
    return out


def candidates(desc: np.ndarray, neighbours: int, min_similarity: float, log=None) -> tuple[np.ndarray, dict]:
    """Pairs [P, 3]: (i, j, how), i < j, j among i's nearest items with similarity >= the floor; how: 1 found as
    it is, 2 found mirrored, 3 both."""
    import faiss

    n = len(desc)
    stats = {"index": "none", "search_s": 0.0}
    if n < 2:
        return np.zeros((0, 3), np.int64), stats
    t0 = time.perf_counter()
    k = min(neighbours + 1, n)
    mirror = mirrored(desc)
    if n <= EXACT_SEARCH_MAX:
        index, project = faiss.IndexFlatIP(64), None
        stats["index"] = "exact inner product"
    else:
        # The graph is built on the descriptors' first INDEX_DIMS principal directions (flip-symmetric: fitted
        # on the descriptors and their mirrors), the similarity that decides is then the full 64-d one.  M 16 /
        # efConstruction 40 / efSearch 32: bench/ann_probe.py and bench/RESULTS.md for cost and recall.
        project = _principal_directions(desc, mirror, INDEX_DIMS)
        index = faiss.IndexHNSWFlat(INDEX_DIMS, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = max(32, 2 * k)
        stats["index"] = (f"HNSW on {INDEX_DIMS} principal directions (M 16, efConstruction 40, "
                          f"efSearch {index.hnsw.efSearch})")
    if log is not None:
        log(f"near duplicates: indexing {n:,} descriptors ({stats['index']}), two lookups each ...")
    index.add(desc if project is None else _project(desc, project))
    found = []
    for mirror_bit, q in ((0, desc), (1, mirror)):
        sim, nb = index.search(q if project is None else _project(q, project), k)
        rows = np.repeat(np.arange(n), k)
        sim, nb = sim.ravel(), nb.ravel()
        if project is not None:  # the reduced space found them; the full descriptors judge them
            hit = nb >= 0
            sim = np.full(nb.shape, -1.0, np.float32)
            sim[hit] = _rowdot(q, desc, rows[hit], nb[hit])
        ok = (nb >= 0) & (nb != rows) & (sim >= min_similarity)
        a, b = rows[ok], nb[ok]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b), np.full(a.size, 1 << mirror_bit)], axis=1))
    allp = np.concatenate(found).astype(np.int64)
    # one row per pair; the third column says which lookup found it: 1 as it is, 2 mirrored, 3 both
    key = allp[:, 0] * n + allp[:, 1]
    uniq, inv = np.unique(key, return_inverse=True)
    how = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(how, inv, allp[:, 2])
    pairs = np.stack([uniq // n, uniq % n, how], axis=1)
    stats["search_s"] = round(time.perf_counter() - t0, 3)
    return pairs, stats


def _flat(thumbs: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Thumbnails with standard deviation under FLAT_STD, in batches (a float copy of 600k thumbnails is 5 GB)."""
    out = np.zeros(len(thumbs), bool)
    for s in range(0, len(thumbs), batch):
        out[s:s + batch] = thumbs[s:s + batch].reshape(-1, THUMB * THUMB).astype(np.float32).std(axis=1) < FLAT_STD
    return out


def near_duplicates(thumbs: np.ndarray, params: Params = Params(), log=None, threads: int | None = None) -> Found:
    """All verified near-duplicate pairs among N thumbnails (uint8 [N, 32, 32])."""
    t0 = time.perf_counter()
    n = len(thumbs)
    flat = _flat(thumbs)
    live = np.flatnonzero(~flat)
    desc = descriptors(thumbs[live])
    cand, stats = candidates(desc, params.neighbours, params.min_candidate_similarity, log)
    if log is not None:
        log(f"near duplicates: {len(cand):,} candidate pairs to verify")
    if len(cand):
        cand = np.concatenate([live[cand[:, :2]], cand[:, 2:]], axis=1)
    t1 = time.perf_counter()
    # numpy releases the GIL in its products and reductions: one thread per core, each with a one-thread BLAS
    # (a BLAS pool per thread would oversubscribe the cores), and no copy of the thumbnails
    from threadpoolctl import threadpool_limits

    workers = max(1, min(threads or os.cpu_count() or 1, 8))
    with threadpool_limits(limits=1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool, \
            progress.progress(total=len(cand), desc="near duplicates: verify", unit="pair") as bar:
        parts = [align.verify_pairs(thumbs, cand[b], params, pool.map, bar.update) for b in align.blocks(cand)]
    ncc = np.concatenate([p[0] for p in parts])
    det = np.concatenate([p[1] for p in parts])
    names = [name for p in parts for name in p[2]]
    idx = np.flatnonzero((ncc >= params.min_ncc) & (det >= params.min_detail))
    stats.update({
        "items": n, "flat_items": int(flat.sum()), "candidate_pairs": len(cand),
        "verified_pairs": int(idx.size), "verify_s": round(time.perf_counter() - t1, 3),
        "total_s": round(time.perf_counter() - t0, 3), "params": params.__dict__,
    })
    return Found(cand[idx, :2] if len(cand) else np.zeros((0, 2), np.int64), ncc[idx], det[idx],
                 [names[i] for i in idx], stats)
