"""Shared fixtures: tiny image files of every awkward kind, and a small real pipeline run on digits."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from tasks.config import Paths


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(seed: int, size: int = 16, channels: int = 3) -> np.ndarray:
    """A distinct, structured image per seed (random blocks), so perceptual hashes differ."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
    img = np.kron(blocks, np.ones((size // 4, size // 4, 1), np.uint8))
    return img[..., 0] if channels == 1 else img


def tmp_paths(root: Path) -> Paths:
    return Paths(raw_items=str(root / "raw"), rejects=str(root / "rejects.parquet"), audit_dir=str(root / "audit"),
                 split_manifest=str(root / "split" / "manifest.parquet"), leakage_report=str(root / "leakage.json"),
                 validate_dir=str(root / "validate"), shards_dir=str(root / "shards"))


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return tmp_paths(tmp_path / "out")


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory):
    """ingest -> split -> shard on builtin digits, once per session (inline workers: fast and deterministic)."""
    from tasks import ingest, shard, split
    from tasks.config import IngestConfig, ShardConfig, SplitConfig

    root = tmp_path_factory.mktemp("digits")
    p = tmp_paths(root)
    ing = ingest.run(IngestConfig(workers=1), p)
    spl = split.run(SplitConfig(), p)
    sh = shard.run(ShardConfig(workers=1), p)
    return p, ing, spl, sh
