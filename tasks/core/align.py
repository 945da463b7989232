"""Aligned cross-correlation: whether a candidate pair of 32x32 grey thumbnails is the same picture under a
flip, a small shift, a crop (a zoom of either side) and a change of light. The verification step of
``tasks.core.neardup`` (its docstring says what is measured and why), and the separable filters both steps use.

Coarse to fine: at 16x16 every flip the candidate lookup suggests, no zoom or 1.14x on either side, shifts up to
half of ``max_shift``; then at 32x32 the best of those, within one pixel of twice the coarse shift and each zoom
step on the side the coarse pass chose. A pair passes when at its best alignment both normalised
cross-correlations pass: ``min_ncc`` on the lightly blurred image and ``min_detail`` on a band-pass image. What
depends on one image only (its blur, 16x16 views, window variances, unit windows) is computed once per item, not
once per pair it is in. The coarse pass correlates through spectra: each item's 16x16 images and unit windows are
transformed once (a DFT as two matrix products), and a pair's 25 shifts are then one elementwise product and one
matrix product, not 25 window sums.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from tasks.core.neardup import Params

SIDE = 32               # the thumbnails' side (pixels): tasks.core.neardup.THUMB
_CHUNK = 1024           # pairs verified per numpy batch (bounded memory: a few MB per array)
_ITEM_BATCH = 1024      # thumbnails per batch of per-item work
_CACHE_ITEMS = 100_000  # items whose coarse-pass quantities (7.1 KB each: 710 MB) are held at once
_GEMM_ROWS = 256        # spectral products are reduced in blocks of this many rows (zero-padded): see _rows_matmul
_SCALES = (32 / 30, 32 / 28)


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
def box_matrix(n: int, m: int) -> np.ndarray:
    """[n - m + 1, n] matrix of ones on m consecutive columns: L @ x @ L.T = every m x m window's sum."""
    k = np.arange(n - m + 1)[:, None]
    i = np.arange(n)[None, :]
    return ((i >= k) & (i < k + m)).astype(np.float32)


def _separable(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """m @ x @ m.T for every image of x [P, n, n] (two batched matrix products).

    A lone image is computed as one of two: OpenBLAS takes another kernel for a one-image product (at 32x32),
    which rounds differently, and an image's result must not depend on how many others share its batch.
    """
    if len(x) == 1:
        return _separable(np.concatenate([x, x]), m)[:1]
    p, n, _ = x.shape
    k = m.shape[0]
    r = (np.ascontiguousarray(x).reshape(p * n, n) @ m.T).reshape(p, n, k)  # one GEMM, not P small ones
    out = (np.ascontiguousarray(r.transpose(0, 2, 1)).reshape(p * k, n) @ m.T).reshape(p, k, k)
    return out.transpose(0, 2, 1)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return _separable(x.astype(np.float32, copy=False), _gauss_matrix(x.shape[1], float(sigma)))


@lru_cache(maxsize=8)
def _cell_blur_matrix(n: int, sigma: float, cells: int) -> np.ndarray:
    """[cells, n] matrix C with C @ x @ C.T = the Gaussian blur of x averaged over cells x cells equal blocks."""
    pool = np.kron(np.eye(cells), np.full((1, n // cells), cells / n))
    return (pool @ _gauss_matrix(n, sigma).astype(np.float64)).astype(np.float32)


def cell_blur(x: np.ndarray, sigma: float, cells: int) -> np.ndarray:
    """``blur`` of x [P, n, n], then the mean of each of cells x cells blocks: [P, cells, cells], in one pair of
    matrix products (the blur and the averaging are both linear; the full-size blurred image is never made)."""
    return _separable(x.astype(np.float32, copy=False), _cell_blur_matrix(x.shape[1], float(sigma), cells))


def _zoom(x: np.ndarray, s: float) -> np.ndarray:
    """Zoom [P, n, n] by s about the centre (an s > 1 zoom is a centred crop resized back)."""
    return _separable(x, _zoom_matrix(x.shape[1], float(s)))


def _halve(x: np.ndarray) -> np.ndarray:
    """[P, n, n] -> [P, n/2, n/2]: the mean of every 2x2 block."""
    return (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) * np.float32(0.25)


def _window_var(A: np.ndarray, m: int) -> np.ndarray:
    """Centred sum of squares of every m x m window of A [P, n, n]: [P, n-m+1, n-m+1]."""
    box = box_matrix(A.shape[1], m)
    A = A - A.mean(axis=(1, 2), keepdims=True)  # float32 sums stay exact enough once centred
    s1 = _separable(A, box)
    return np.maximum(_separable(A * A, box) - s1 * s1 / (m * m), 0.0)


def _unit_centre(B: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """B's central window (r pixels in from every side) at zero mean and unit length, and its length before."""
    n = B.shape[1]
    b = B[:, r:n - r, r:n - r].astype(np.float32)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    bn = np.sqrt(np.einsum("pij,pij->p", b, b))
    return b / np.maximum(bn, 1e-6)[:, None, None], bn


def _ncc(A: np.ndarray, var: np.ndarray, b: np.ndarray, bn: np.ndarray, r: int) -> np.ndarray:
    """NCC of the unit window b against A's window at every shift up to r: [P, 2r+1, 2r+1].

    ``var`` is ``_window_var(A)``, ``(b, bn)`` is ``_unit_centre(B)``: both depend on one image only, so a caller
    that meets an image in many pairs computes them once.
    """
    m = b.shape[1]
    out = np.empty((len(A), 2 * r + 1, 2 * r + 1), np.float32)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            # b is zero-mean, so the window's mean drops out of the numerator
            out[:, dy, dx] = np.einsum("pij,pij->p", A[:, dy:dy + m, dx:dx + m], b)
    return _normalised(out, var, bn)


def _normalised(num: np.ndarray, var: np.ndarray, bn: np.ndarray) -> np.ndarray:
    """Window correlations ``num`` [P, S, S] of unit windows -> NCC: divided by each A window's length
    (``sqrt(var)``); 0 where that window or b (length ``bn``) is flat."""
    den = np.sqrt(var)
    out = np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0).astype(np.float32, copy=False)
    out[bn <= 1e-6] = 0.0
    return out


@lru_cache(maxsize=8)
def _correlation_matrix(n: int, r: int) -> np.ndarray:
    """float32 [2 * n * (n // 2 + 1), (2r+1)^2]: the product of two ``_rfft2`` spectra (n x n images, as
    interleaved (re, im) pairs, as ``complex64.view(float32)`` lays them out) -> their circular cross-correlation
    at the shifts (0..2r, 0..2r). The rows of ``irfft2`` restricted to those shifts, built from its basis images."""
    h = n // 2 + 1
    m = np.zeros((2 * n * h, (2 * r + 1) ** 2))
    for i in range(n * h):
        kx, ky = divmod(i, n)  # _rfft2's layout: kx-major
        for part, value in ((0, 1.0), (1, 1j)):
            x = np.zeros((n, h), complex)
            x[ky, kx] = value
            m[2 * i + part] = np.fft.irfft2(x, s=(n, n))[:2 * r + 1, :2 * r + 1].ravel()
    return m.astype(np.float32)


def _rows_matmul(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x [P, K] @ m [K, S] in blocks of ``_GEMM_ROWS`` rows, the last zero-padded: BLAS picks its kernel by the
    matrix sizes, and a row's result must not depend on how many rows share its batch."""
    out = np.empty((len(x), m.shape[1]), np.float32)
    for s in range(0, len(x), _GEMM_ROWS):
        block = x[s:s + _GEMM_ROWS]
        if len(block) < _GEMM_ROWS:
            block = np.concatenate([block, np.zeros((_GEMM_ROWS - len(block), x.shape[1]), x.dtype)])
        out[s:s + _GEMM_ROWS] = (block @ m)[:min(_GEMM_ROWS, len(x) - s)]
    return out


@lru_cache(maxsize=8)
def _dft_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The two real matrices of ``_rfft2``: x -> (re, im) of its DFT along x [n, 2h] (h = n // 2 + 1), then the
    complex DFT along y of (re, im) stacked [2n, 2n], its output columns interleaved (re, im) per frequency."""
    h = n // 2 + 1
    ang = 2 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
    c, s = np.cos(ang), np.sin(ang)
    second = np.empty((2 * n, n, 2))
    second[:, :, 0], second[:, :, 1] = np.concatenate([c, s]), np.concatenate([-s, c])
    first = np.concatenate([c[:, :h], -s[:, :h]], axis=1)
    return first.astype(np.float32), second.reshape(2 * n, 2 * n).astype(np.float32)


def _rfft2(x: np.ndarray) -> np.ndarray:
    """The 2-D DFT of every real image of x [P, n, n] as two real matrix products: complex64 [P, h, n], the
    values of ``np.fft.rfft2`` transposed (kx-major, h = n // 2 + 1), which is what the second product leaves
    without a copy. For 16x16 images several times faster than pocketfft's batched transform, and as exact in
    float32 (~1e-7 relative). A lone image is computed as one of two, as in ``_separable``."""
    if len(x) == 1:
        return _rfft2(np.concatenate([x, x]))[:1]
    p, n, _ = x.shape
    h = n // 2 + 1
    first, second = _dft_matrices(n)
    z = (np.ascontiguousarray(x, np.float32).reshape(p * n, n) @ first).reshape(p, n, 2, h)  # [p, y, re/im, kx]
    z = np.ascontiguousarray(z.transpose(0, 3, 2, 1)).reshape(p * h, 2 * n)                  # [p, kx, (re y, im y)]
    return (z @ second).view(np.complex64).reshape(p, h, n)                                   # [p, kx, ky]


def _spectrum_a(A: np.ndarray) -> np.ndarray:
    """complex64 [P, n * (n // 2 + 1)]: ``rfft2`` of each image of A [P, n, n] at zero mean (the correlation
    with a zero-mean window does not see A's mean; removing it keeps the float32 spectrum's rounding small)."""
    return _rfft2(A - A.mean(axis=(1, 2), keepdims=True)).reshape(len(A), -1)


def _spectrum_b(unit: np.ndarray, n: int) -> np.ndarray:
    """complex64 [P, n * (n // 2 + 1)]: the conjugate ``rfft2`` of each unit window [P, m, m] zero-padded to n x n
    at the top left, so that the product with ``_spectrum_a`` is the correlation of A's m x m windows with it."""
    m = unit.shape[1]
    pad = np.zeros((len(unit), n, n), np.float32)
    pad[:, :m, :m] = unit
    return np.conj(_rfft2(pad)).reshape(len(unit), -1)


def _ncc_spectral(fa: np.ndarray, var: np.ndarray, fb: np.ndarray, bn: np.ndarray, n: int, r: int) -> np.ndarray:
    """``_ncc`` from spectra: fa ``_spectrum_a`` of A [P, n, n], fb ``_spectrum_b`` of b's unit window, var and bn
    as there. The correlation at all (2r+1)^2 shifts is one product of the spectra and one matrix product
    (``_correlation_matrix``); the circular correlation is the windows' one at these shifts (m + 2r = n, b padded
    with zeros). No window of A is gathered, and the sums leave out A's mean (more exact than the window sums
    in float32)."""
    num = _rows_matmul((fa * fb).view(np.float32), _correlation_matrix(n, r)).reshape(len(fa), 2 * r + 1, 2 * r + 1)
    return _normalised(num, var, bn)


def _ncc_shifts(A: np.ndarray, B: np.ndarray, r: int) -> np.ndarray:
    """NCC of B's central window against A's window at every shift up to r: [P, 2r+1, 2r+1]."""
    return _ncc(A, _window_var(A, A.shape[1] - 2 * r), *_unit_centre(B, r), r)


def _best(scores: list[np.ndarray], r: int):
    """Max NCC over views and shifts (``scores``: one [P, 2r+1, 2r+1] per view): score [P], view [P], shift [P, 2]."""
    flat = np.stack([s.reshape(len(s), -1) for s in scores], axis=1).reshape(len(scores[0]), -1)  # [P, V * S]
    arg = flat.argmax(axis=1)
    view, sh = np.divmod(arg, (2 * r + 1) ** 2)
    dy, dx = np.divmod(sh, 2 * r + 1)
    return flat[np.arange(len(flat)), arg], view, np.stack([dy - r, dx - r], axis=1)


class _CoarseItems(NamedTuple):
    """What the coarse pass needs of each item, computed once per item rather than once per pair it is in.

    The item's 16x16 image (the 0.7 px blur, halved), plain and zoomed by ``_SCALES[-1]``: as the first image
    of a pair, the spectra of the images and their window variances; as the second, as it is and mirrored, the
    spectra of the unit central windows of both and their lengths.  View-major (items on the second or third
    axis), so that a pair's gather reads whole rows.
    """
    spec: np.ndarray   # complex64 [2, N, K]: [plain, zoomed], K = 16 * 9
    var: np.ndarray    # float32 [2, N, S, S]
    unit: np.ndarray   # complex64 [2, 2, N, K]: [as it is, mirrored][plain, zoomed]
    norm: np.ndarray   # float32 [2, 2, N]


def _empty_coarse_items(n: int, r: int) -> _CoarseItems:
    """Room for the ``_CoarseItems`` of n items (filled batch by batch: no second copy of a list of parts)."""
    side = SIDE // 2
    s, k = 2 * r + 1, side * (side // 2 + 1)
    return _CoarseItems(np.empty((2, n, k), np.complex64), np.empty((2, n, s, s), np.float32),
                        np.empty((2, 2, n, k), np.complex64), np.empty((2, 2, n), np.float32))


def _fill_coarse_items(out: _CoarseItems, at: slice, blurred: np.ndarray, r: int) -> None:
    """Write the ``_CoarseItems`` of the blurred 32x32 thumbnails [N, 32, 32] into ``out`` at items ``at``."""
    half = _halve(blurred)
    n, side, _ = half.shape
    mirror = np.ascontiguousarray(half[:, :, ::-1])
    zoomed, zoomed_mirror = _zoom(half, _SCALES[-1]), _zoom(mirror, _SCALES[-1])
    m = side - 2 * r
    out.spec[:, at] = _spectrum_a(np.concatenate([half, zoomed])).reshape(2, n, -1)
    out.var[0, at], out.var[1, at] = _window_var(half, m), _window_var(zoomed, m)
    unit, norm = zip(*(_unit_centre(x, r) for x in (half, zoomed, mirror, zoomed_mirror)))
    out.unit[:, :, at] = _spectrum_b(np.concatenate(unit), side).reshape(2, 2, n, -1)
    out.norm[:, :, at] = np.stack(norm).reshape(2, 2, n)


class _Alignment(NamedTuple):
    """The coarse pass's best alignment of each pair."""
    score: np.ndarray  # float32 [P]; -2 before any view is scored
    view: np.ndarray   # int64 [P]: 0 as it is, 1 b zoomed, 2 a zoomed
    shift: np.ndarray  # int64 [P, 2]: (dy, dx) at 16x16
    flip: np.ndarray   # bool [P]: b mirrored


def _coarse(items: _CoarseItems, ia: np.ndarray, ib: np.ndarray, how: np.ndarray, r: int) -> _Alignment:
    """The best 16x16 alignment of pairs (items[ia], items[ib]) over the flips ``how`` allows (1 as it is,
    2 mirrored, 3 both), no zoom or ``_SCALES[-1]`` on either side, and shifts up to r."""
    p = len(ia)
    out = _Alignment(np.full(p, -2.0, np.float32), np.zeros(p, np.int64), np.zeros((p, 2), np.int64),
                     np.zeros(p, bool))
    for mirror in (0, 1):
        sel = np.flatnonzero(how & (1 << mirror))
        if not sel.size:
            continue
        a, b = ia[sel], ib[sel]
        side = SIDE // 2
        # the views in the order of their index: (a, b), (a, b zoomed), (a zoomed, b)
        score, view, sh = _best([_ncc_spectral(items.spec[za][a], items.var[za][a], items.unit[mirror, zb][b],
                                               items.norm[mirror, zb][b], side, r)
                                 for za, zb in ((0, 0), (0, 1), (1, 0))], r)
        up = score > out.score[sel]
        idx = sel[up]
        out.score[idx], out.view[idx], out.shift[idx], out.flip[idx] = score[up], view[up], sh[up], bool(mirror)
    return out


def _gather_windows(X: np.ndarray, oy: np.ndarray, ox: np.ndarray, size: int) -> np.ndarray:
    """X[p, oy[p]:oy[p]+size, ox[p]:ox[p]+size] for every p (one gather of whole rows from a strided view)."""
    return sliding_window_view(X, (size, size), axis=(1, 2))[np.arange(len(X)), oy, ox]


_ZOOMS = [(1.0, 1.0), *((1.0, s) for s in _SCALES), *((s, 1.0) for s in _SCALES)]  # the fine pass's (a, b) views


def _view_scores(fa: np.ndarray, fb: np.ndarray, v: int, oy: np.ndarray, ox: np.ndarray, r: int,
                 detail: bool = False) -> np.ndarray:
    """NCC [P, 9] of fine view v of pairs (fa, fb) [P, 32, 32] at the 3x3 shifts around (oy, ox); ``detail``:
    on the band-pass (difference of Gaussians, sigma 0.7 minus 3) images."""
    za, zb = _ZOOMS[v]
    A = fa if za == 1.0 else _zoom(fa, za)
    B = fb if zb == 1.0 else _zoom(fb, zb)
    if detail:
        A, B = A - blur(A, 3.0), B - blur(B, 3.0)
    m = fa.shape[1] - 2 * r
    wa = _gather_windows(A, oy, ox, m + 2)
    wb = B[:, r - 1:r + m + 1, r - 1:r + m + 1]
    return _ncc_shifts(wa, wb, 1).reshape(len(fa), 9)


def _name(flip: bool, dy: int, dx: int, v: int) -> str:
    """The alignment in words, e.g. "flip, shift (1, 0) px, zoom b x1.14"; "aligned" when it is none of them."""
    parts = ["flip"] if flip else []
    if dy or dx:
        parts.append(f"shift ({dx}, {dy}) px")
    za, zb = _ZOOMS[v]
    if za > 1 or zb > 1:
        parts.append(f"zoom {'a' if za > 1 else 'b'} x{max(za, zb):.2f}")
    return ", ".join(parts) or "aligned"


def _fine(a: np.ndarray, b: np.ndarray, coarse: _Alignment, params: Params
          ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ncc, detail, transform) at 32x32 of pairs (a, b) [P, 32, 32] (0.7 px blurred) that passed the coarse pass.

    The flip the coarse pass chose, each zoom step on the side it chose (all of them when it chose none), shifts
    within one pixel of twice its shift; then, only where that NCC passes ``min_ncc`` (elsewhere the pair fails
    whatever its detail: -1 and ""), the band-pass NCC at the best of those and the alignment's name.
    """
    p, r = len(a), params.max_shift
    fb = np.where(coarse.flip[:, None, None], b[:, :, ::-1], b)
    side = coarse.view  # zoom side from the coarse view: 0 none, 1 b zoomed, 2 a zoomed
    # window of A around twice the coarse shift (one pixel of slack each way), B's central window
    oy = np.clip(r + 2 * coarse.shift[:, 0], 1, 2 * r - 1) - 1
    ox = np.clip(r + 2 * coarse.shift[:, 1], 1, 2 * r - 1) - 1
    best = np.full(p, -2.0, np.float32)
    bview = np.zeros(p, np.int64)
    bshift = np.zeros((p, 2), np.int64)
    m = a.shape[1] - 2 * r
    # each side's zoom steps are prepared once and shared by the views that use them (a unzoomed: views 0-2,
    # b unzoomed: 0, 3, 4): a's windows around the coarse shift and their variances, b's unit central window
    zoomed_a, zoomed_b = np.flatnonzero(side != 1), np.flatnonzero(side != 2)
    prep_a, prep_b = {}, {}
    for z in (1.0, *_SCALES):
        ka = np.arange(p) if z == 1.0 else zoomed_a
        if ka.size:
            A = a[ka] if z == 1.0 else _zoom(a[ka], z)
            wa = _gather_windows(A, oy[ka], ox[ka], m + 2)
            prep_a[z] = (ka, wa, _window_var(wa, m))
        kb = np.arange(p) if z == 1.0 else zoomed_b
        if kb.size:
            B = fb[kb] if z == 1.0 else _zoom(fb[kb], z)
            prep_b[z] = (kb, *_unit_centre(B[:, r - 1:r + m + 1, r - 1:r + m + 1], 1))
    for v, (za, zb) in enumerate(_ZOOMS):
        if za not in prep_a or zb not in prep_b:
            continue
        ka, wa, var = prep_a[za]
        kb, unit, norm = prep_b[zb]
        sel = ka if za > 1 else kb  # the pairs of this view: every pair when neither side zooms
        # rows of this view in each side's prepared arrays (a zoomed: kb is all pairs; b zoomed: ka is)
        ra, rb = (slice(None), sel) if za > 1 else (sel, slice(None))
        sc = _ncc(wa[ra], var[ra], unit[rb], norm[rb], 1).reshape(len(sel), 9)
        arg = sc.argmax(axis=1)
        top = sc[np.arange(len(sel)), arg]
        up = top > best[sel]
        idx = sel[up]
        best[idx], bview[idx] = top[up], v
        bshift[idx] = np.stack([oy[idx] + arg[up] // 3 - r, ox[idx] + arg[up] % 3 - r], axis=1)
    detail = np.full(p, -1.0, np.float32)
    names = [""] * p
    shaped = best >= params.min_ncc
    for v in np.unique(bview[shaped]):
        sel = np.flatnonzero(shaped & (bview == v))
        detail[sel] = _view_scores(a[sel], fb[sel], int(v), oy[sel], ox[sel], r, detail=True).max(axis=1)
    for k in np.flatnonzero(shaped):
        names[k] = _name(bool(coarse.flip[k]), int(bshift[k, 0]), int(bshift[k, 1]), int(bview[k]))
    return best, detail, names


def _take(x: NamedTuple, idx: np.ndarray):
    """The rows idx of every array of a NamedTuple of arrays."""
    return type(x)(*(f[idx] for f in x))


def _cat(parts: list):
    """NamedTuples of arrays joined row-wise, field by field."""
    return type(parts[0])(*(np.concatenate(f) for f in zip(*parts)))


def _coarse_shift(params: Params) -> int:
    """The coarse pass's shift range at 16x16: half of ``max_shift``, at least one pixel."""
    return max(1, (params.max_shift + 1) // 2)


def verify(ta: np.ndarray, tb: np.ndarray, params: Params, how: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Scores for thumbnail pairs [P, 32, 32]: (passed, ncc, detail, transform names).

    Coarse to fine: at 16x16 every flip the candidate lookup suggests (``how``: 1 as it is, 2 mirrored, 3 both),
    no zoom or 1.14x on either side, shifts up to half of ``max_shift``; then at 32x32 the best of those, within
    one pixel of twice the coarse shift and each zoom step on the side the coarse pass chose.  ncc is -1 where
    the coarse pass drops a pair; detail -1 and the name "" where ncc fails (the pair fails either way).
    """
    p = len(ta)
    how = np.full(p, 3, np.int64) if how is None else how
    ncc, detail, names = verify_pairs(np.concatenate([ta, tb]), np.stack([np.arange(p), np.arange(p, 2 * p), how],
                                                                          axis=1), params)
    return (ncc >= params.min_ncc) & (detail >= params.min_detail), ncc, detail, names


def _slices(n: int, size: int) -> list[slice]:
    return [slice(s, s + size) for s in range(0, n, size)]


def blocks(cand: np.ndarray) -> list[slice]:
    """Runs of candidate pairs that touch at most ``_CACHE_ITEMS`` items each (one run when all of them fit)."""
    if len(np.unique(cand[:, :2])) <= _CACHE_ITEMS:  # also the one (empty) run of no pairs
        return [slice(0, len(cand))]
    return _slices(len(cand), _CACHE_ITEMS // 2)


def _coarse_block(thumbs: np.ndarray, items: np.ndarray, ia: np.ndarray, ib: np.ndarray, how: np.ndarray, r: int,
                  mapper, done) -> _Alignment:
    """The coarse pass over pairs (items[ia], items[ib]) of ``thumbs``, each item's quantities computed once."""
    per_item = _empty_coarse_items(len(items), r)

    def fill(s: slice) -> None:
        _fill_coarse_items(per_item, s, blur(thumbs[items[s]], 0.7), r)

    list(mapper(fill, _slices(len(items), _ITEM_BATCH)))
    parts = []
    for part in mapper(lambda s: _coarse(per_item, ia[s], ib[s], how[s], r), _slices(len(ia), _CHUNK)):
        parts.append(part)
        done(len(part.score))
    return _cat(parts)


def _fine_block(thumbs: np.ndarray, items: np.ndarray, ia: np.ndarray, ib: np.ndarray, align: _Alignment,
                params: Params, mapper) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The fine pass over pairs (items[ia], items[ib]) of ``thumbs`` with their coarse alignment, each item
    blurred once."""
    kept, inv = np.unique(np.concatenate([ia, ib]), return_inverse=True)
    ka, kb = inv.reshape(2, -1)
    blurred = np.empty((len(kept), SIDE, SIDE), np.float32)

    def fill(s: slice) -> None:
        blurred[s] = blur(thumbs[items[kept[s]]], 0.7)

    list(mapper(fill, _slices(len(kept), _ITEM_BATCH)))
    parts = list(mapper(lambda s: _fine(blurred[ka[s]], blurred[kb[s]], _take(align, s), params),
                        _slices(len(ia), _CHUNK)))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [name for p in parts for name in p[2]])


def verify_pairs(thumbs: np.ndarray, cand: np.ndarray, params: Params, mapper=map, done=lambda n: None
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ncc, detail, transform) of candidate pairs [P, 3] (i, j, how) of ``thumbs``, as ``verify`` defines them.

    The work that depends on one image (blur, 16x16 views, window variances, unit windows) is done once per
    item rather than once per pair it is in; the same operations on the same values, so the same numbers.
    ``mapper``: a map over chunks (a thread pool's), ``done(k)``: k more pairs through the coarse pass.
    """
    ncc = np.full(len(cand), -1.0, np.float32)
    detail = np.full(len(cand), -1.0, np.float32)
    names = [""] * len(cand)
    if not len(cand):
        return ncc, detail, names
    items, inv = np.unique(cand[:, :2], return_inverse=True)
    ia, ib = inv.reshape(-1, 2).T
    align = _coarse_block(thumbs, items, ia, ib, cand[:, 2], _coarse_shift(params), mapper, done)
    keep = np.flatnonzero(align.score >= params.min_coarse)
    if keep.size:
        ncc[keep], detail[keep], fine_names = _fine_block(thumbs, items, ia[keep], ib[keep], _take(align, keep),
                                                          params, mapper)
        for k, name in zip(keep, fine_names):
            names[k] = name
    return ncc, detail, names

