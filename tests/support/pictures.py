"""Smooth random grey pictures for near-duplicate tests: blurred noise has blobs and edges at the scales of a small
photo, so a shifted window of it is a real translation (no wrap-around) and two seeds are unrelated images."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def canvas(seed: int, size: int = 40, sigma: float = 2.5) -> np.ndarray:
    """A smooth random grey picture, 30..220."""
    x = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return (30 + 190 * x).astype(np.uint8)


def crop(c: np.ndarray, dy: int = 0, dx: int = 0, s: int = 32) -> np.ndarray:
    """The s x s window of c, centred, moved by (dy, dx)."""
    o = (c.shape[0] - s) // 2
    return np.ascontiguousarray(c[o + dy:o + dy + s, o + dx:o + dx + s])
