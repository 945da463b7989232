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
   gradients that make two different photos of sky or road correlate.

Flat thumbnails (standard deviation under ``FLAT_STD`` grey levels: blank frames) carry no shape to compare; they
are not linked here (exact pixel hashes still join identical ones) and are counted in the stats.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from tasks.core import progress

THUMB = 32              # thumbnail side (pixels)
EXACT_SEARCH_MAX = 20_000
INDEX_DIMS = 32         # principal directions the HNSW graph is built on (above EXACT_SEARCH_MAX items)
FLAT_STD = 2.0
_CHUNK = 1024           # pairs verified per numpy batch (bounded memory: a few MB per array)
_SCALES = (32 / 30, 32 / 28)


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


@lru_cache(maxsize=32)
def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix G with G @ x = a 1-D Gaussian blur of x (edges repeated, as scipy's mode='nearest')."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.eye(n), sigma, axis=0, mode="nearest").astype(np.float32)


@lru_cache(maxsize=32)
def _zoom_matrix(n: int, s: float) -> np.ndarray:
    """[n, n] matrix Z with Z @ x = x zoomed by s about its centre (linear interpolation, edges repeated)."""
    c = (n - 1) / 2
    src = np.clip(c + (np.arange(n) - c) / s, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).astype(np.float32)
    z = np.zeros((n, n), np.float32)
    z[np.arange(n), lo] += 1 - w
    z[np.arange(n), hi] += w
    return z


@lru_cache(maxsize=32)
def _box_matrix(n: int, m: int) -> np.ndarray:
    """[n - m + 1, n] matrix of ones on m consecutive columns: L @ x @ L.T = every m x m window's sum."""
    k = np.arange(n - m + 1)[:, None]
    i = np.arange(n)[None, :]
    return ((i >= k) & (i < k + m)).astype(np.float32)


def _separable(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """m @ x @ m.T for every image of x [P, n, n] (two batched matrix products)."""
    p, n, _ = x.shape
    k = m.shape[0]
    r = (np.ascontiguousarray(x).reshape(p * n, n) @ m.T).reshape(p, n, k)  # one GEMM, not P small ones
    out = (np.ascontiguousarray(r.transpose(0, 2, 1)).reshape(p * k, n) @ m.T).reshape(p, k, k)
    return out.transpose(0, 2, 1)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return _separable(x.astype(np.float32, copy=False), _gauss_matrix(x.shape[1], float(sigma)))


def descriptors(thumbs: np.ndarray, batch: int = 8192) -> np.ndarray:
    """float32 [N, 64]: blurred 8x8 cell means, zero mean, unit length (zeros for flat thumbnails)."""
    n = len(thumbs)
    out = np.zeros((n, 64), np.float32)
    for s in range(0, n, batch):
        b = _blur(thumbs[s:s + batch].astype(np.float32), 1.0)
        d = b.reshape(len(b), 8, 4, 8, 4).mean(axis=(2, 4)).reshape(len(b), 64)
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


def _zoom(x: np.ndarray, s: float) -> np.ndarray:
    """Zoom [P, n, n] by s about the centre (an s > 1 zoom is a centred crop resized back)."""
    return _separable(x, _zoom_matrix(x.shape[1], float(s)))


def _window_var(A: np.ndarray, m: int) -> np.ndarray:
    """Centred sum of squares of every m x m window of A [P, n, n]: [P, n-m+1, n-m+1]."""
    box = _box_matrix(A.shape[1], m)
    A = A - A.mean(axis=(1, 2), keepdims=True)  # float32 sums stay exact enough once centred
    s1 = _separable(A, box)
    return np.maximum(_separable(A * A, box) - s1 * s1 / (m * m), 0.0)


def _ncc_shifts(A: np.ndarray, B: np.ndarray, r: int) -> np.ndarray:
    """NCC of B's central window against A's window at every shift up to r: [P, 2r+1, 2r+1]."""
    p, n, _ = A.shape
    m = n - 2 * r
    b = B[:, r:n - r, r:n - r].astype(np.float32)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    bn = np.sqrt(np.einsum("pij,pij->p", b, b))
    b = b / np.maximum(bn, 1e-6)[:, None, None]
    var = _window_var(A, m)
    out = np.empty((p, 2 * r + 1, 2 * r + 1), np.float32)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            # b is zero-mean, so the window's mean drops out of the numerator
            out[:, dy, dx] = np.einsum("pij,pij->p", A[:, dy:dy + m, dx:dx + m], b)
    den = np.sqrt(var)
    out = np.where(den > 1e-6, out / np.maximum(den, 1e-6), 0.0)
    out[bn <= 1e-6] = 0.0
    return out


def _best(views, r: int):
    """Max NCC over views and shifts: (score [P], view index [P], shift (dy, dx) [P, 2])."""
    scores = np.stack([_ncc_shifts(A, B, r).reshape(len(A), -1) for A, B in views], axis=1)  # [P, V, S]
    flat = scores.reshape(len(scores), -1)
    arg = flat.argmax(axis=1)
    view, sh = np.divmod(arg, scores.shape[2])
    dy, dx = np.divmod(sh, 2 * r + 1)
    return flat[np.arange(len(flat)), arg], view, np.stack([dy - r, dx - r], axis=1)


def _views(A: np.ndarray, B: np.ndarray, scales) -> tuple[list, list[str]]:
    """(A, B') views: as they are, then B zoomed by each scale, then A zoomed by each scale."""
    out, names = [(A, B)], [""]
    for s in scales:
        out.append((A, _zoom(B, s)))
        names.append(f"zoom b x{s:.2f}")
    for s in scales:
        out.append((_zoom(A, s), B))
        names.append(f"zoom a x{s:.2f}")
    return out, names


def _gather_windows(X: np.ndarray, oy: np.ndarray, ox: np.ndarray, size: int) -> np.ndarray:
    """X[p, oy[p]:oy[p]+size, ox[p]:ox[p]+size] for every p (one gather)."""
    k = np.arange(size)
    return X[np.arange(len(X))[:, None, None], (oy[:, None] + k)[:, :, None], (ox[:, None] + k)[:, None, :]]


def verify(ta: np.ndarray, tb: np.ndarray, params: Params, how: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Scores for thumbnail pairs [P, 32, 32]: (passed, ncc, detail, transform names).

    Coarse to fine: at 16x16 every flip the candidate lookup suggests (``how``: 1 as it is, 2 mirrored, 3 both),
    no zoom or 1.14x on either side, shifts up to half of ``max_shift``; then at 32x32 the best of those, within
    one pixel of twice the coarse shift and each zoom step on the side the coarse pass chose.
    """
    p = len(ta)
    how = np.full(p, 3, np.int64) if how is None else how
    a = _blur(ta.astype(np.float32), 0.7)
    b = _blur(tb.astype(np.float32), 0.7)
    ca = a.reshape(p, 16, 2, 16, 2).mean(axis=(2, 4))
    cb = b.reshape(p, 16, 2, 16, 2).mean(axis=(2, 4))
    rc = max(1, (params.max_shift + 1) // 2)
    coarse = np.full(p, -2.0, np.float32)
    cview = np.zeros(p, np.int64)
    cshift = np.zeros((p, 2), np.int64)
    flip = np.zeros(p, bool)
    for mirror in (False, True):
        sel = np.flatnonzero(how & (2 if mirror else 1))
        if not sel.size:
            continue
        sb = cb[sel][:, :, ::-1] if mirror else cb[sel]
        views, _ = _views(ca[sel], np.ascontiguousarray(sb), _SCALES[1:])
        score, view, sh = _best(views, rc)
        up = score > coarse[sel]
        idx = sel[up]
        coarse[idx], cview[idx], cshift[idx], flip[idx] = score[up], view[up], sh[up], mirror
    ncc = np.full(p, -1.0, np.float32)
    detail = np.full(p, -1.0, np.float32)
    names = [""] * p
    keep = np.flatnonzero(coarse >= params.min_coarse)
    if keep.size:
        r, n = params.max_shift, a.shape[1]
        m = n - 2 * r
        fa = a[keep]
        fb = np.where(flip[keep, None, None], b[keep, :, ::-1], b[keep])
        # zoom side from the coarse view: 0 none, 1 b zoomed, 2 a zoomed
        side = cview[keep]
        # window of A around twice the coarse shift (one pixel of slack each way), B's central window
        oy = np.clip(r + 2 * cshift[keep, 0], 1, 2 * r - 1) - 1
        ox = np.clip(r + 2 * cshift[keep, 1], 1, 2 * r - 1) - 1
        best = np.full(keep.size, -2.0, np.float32)
        bview = np.zeros(keep.size, np.int64)
        bshift = np.zeros((keep.size, 2), np.int64)
        for v, (za, zb) in enumerate([(1.0, 1.0), *((1.0, s) for s in _SCALES), *((s, 1.0) for s in _SCALES)]):
            sel = np.flatnonzero((side == 0) | ((side == 1) & (zb > 1)) | ((side == 2) & (za > 1))) if v else \
                np.arange(keep.size)
            if not sel.size:
                continue
            A = fa[sel] if za == 1.0 else _zoom(fa[sel], za)
            B = fb[sel] if zb == 1.0 else _zoom(fb[sel], zb)
            wa = _gather_windows(A, oy[sel], ox[sel], m + 2)
            wb = B[:, r - 1:r + m + 1, r - 1:r + m + 1]
            sc = _ncc_shifts(wa, wb, 1).reshape(len(sel), 9)
            arg = sc.argmax(axis=1)
            top = sc[np.arange(len(sel)), arg]
            up = top > best[sel]
            idx = sel[up]
            best[idx], bview[idx] = top[up], v
            bshift[idx] = np.stack([oy[idx] + arg[up] // 3 - r, ox[idx] + arg[up] % 3 - r], axis=1)
        ncc[keep] = best
        # band-pass (difference of Gaussians, sigma 0.7 minus 3) at the chosen zoom, the same 3x3 shifts
        zooms = [(1.0, 1.0), *((1.0, s) for s in _SCALES), *((s, 1.0) for s in _SCALES)]
        for v in np.unique(bview):
            sel = np.flatnonzero(bview == v)
            za, zb = zooms[v]
            A = fa[sel] if za == 1.0 else _zoom(fa[sel], za)
            B = fb[sel] if zb == 1.0 else _zoom(fb[sel], zb)
            A, B = A - _blur(A, 3.0), B - _blur(B, 3.0)
            wa = _gather_windows(A, oy[sel], ox[sel], m + 2)
            wb = B[:, r - 1:r + m + 1, r - 1:r + m + 1]
            detail[keep[sel]] = _ncc_shifts(wa, wb, 1).reshape(len(sel), 9).max(axis=1)
        for j, i in enumerate(keep):
            parts = ["flip"] if flip[i] else []
            dy, dx = int(bshift[j, 0]), int(bshift[j, 1])
            if dy or dx:
                parts.append(f"shift ({dx}, {dy}) px")
            za, zb = zooms[bview[j]]
            if za > 1 or zb > 1:
                parts.append(f"zoom {'a' if za > 1 else 'b'} x{max(za, zb):.2f}")
            names[i] = ", ".join(parts) or "aligned"
    passed = (ncc >= params.min_ncc) & (detail >= params.min_detail)
    return passed, ncc, detail, names


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
    passed_all, ncc_all, det_all, names_all = [], [], [], []
    t1 = time.perf_counter()
    chunks = [cand[s:s + _CHUNK] for s in range(0, len(cand), _CHUNK)]

    def check(c: np.ndarray):
        return verify(thumbs[c[:, 0]], thumbs[c[:, 1]], params, c[:, 2])

    # numpy releases the GIL in its products and reductions: one thread per core, each with a one-thread BLAS
    # (a BLAS pool per thread would oversubscribe the cores), and no copy of the thumbnails
    from threadpoolctl import threadpool_limits

    workers = max(1, min(threads or os.cpu_count() or 1, 8))
    with threadpool_limits(limits=1 if workers > 1 else None), ThreadPoolExecutor(workers) as pool, \
            progress.progress(total=len(cand), desc="near duplicates: verify", unit="pair") as bar:
        for c, (ok, ncc, det, names) in zip(chunks, pool.map(check, chunks)):
            passed_all.append(ok)
            ncc_all.append(ncc)
            det_all.append(det)
            names_all += names
            bar.update(len(c))
    if passed_all:
        ok = np.concatenate(passed_all)
        ncc, det = np.concatenate(ncc_all), np.concatenate(det_all)
    else:
        ok, ncc, det = np.zeros(0, bool), np.zeros(0, np.float32), np.zeros(0, np.float32)
    idx = np.flatnonzero(ok)
    stats.update({
        "items": n, "flat_items": int(flat.sum()), "candidate_pairs": len(cand),
        "verified_pairs": int(idx.size), "verify_s": round(time.perf_counter() - t1, 3),
        "total_s": round(time.perf_counter() - t0, 3), "params": params.__dict__,
    })
    return Found(cand[idx, :2] if len(cand) else np.zeros((0, 2), np.int64), ncc[idx], det[idx],
                 [names_all[i] for i in idx], stats)
