"""Shared fixtures: tiny image files of every awkward kind, and a small real pipeline run on digits."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# One torch/OpenMP thread per test process (and the stages they start): `make test` runs one xdist worker per
# core, and a second thread per worker only fights the other worker for the same cores (2-4x slower steps).
# Set before anything imports torch; a user's own OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tasks.core.config import Paths


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
                 leakage_picture=str(root / "leakage.png"),
                 validate_dir=str(root / "validate"), shards_dir=str(root / "shards"), models_dir=str(root / "models"),
                 checkpoints_dir=str(root / "checkpoints"),
                 train_metrics=str(root / "metrics" / "train.json"), train_plots_dir=str(root / "reports" / "train"),
                 evaluate_dir=str(root / "reports" / "evaluate"), test_metrics=str(root / "metrics" / "test.json"),
                 test_ledger=str(root / "test_ledger"), register_report=str(root / "reports" / "register.json"))


LAYERS = ("unit", "stage", "e2e", "contracts", "reliability")  # one marker per folder: `pytest -m unit` runs tests/unit


def pytest_collection_modifyitems(config, items):
    root = Path(__file__).parent
    for item in items:
        layer = Path(item.path).relative_to(root).parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return tmp_paths(tmp_path / "out")


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory):
    """ingest -> split -> shard on builtin digits, once per session (inline workers: fast and deterministic)."""
    from tasks import ingest, shard, split
    from tasks.core.config import IngestConfig, ShardConfig, SplitConfig

    root = tmp_path_factory.mktemp("digits")
    p = tmp_paths(root)
    ing = ingest.run(IngestConfig(workers=1), p)
    spl = split.run(SplitConfig(), p)
    sh = shard.run(ShardConfig(workers=1), p)
    return p, ing, spl, sh


# The model the evaluate/register/serving tests share: the default recipe, shortened (well above 0.9 val accuracy).
DIGITS_TRAIN = {"model": "resnet10t", "epochs": 4, "batch_size": 64, "warmup_steps": 20, "lr": 0.004,
                "log_every_steps": 5}


@pytest.fixture(scope="session")
def digits_trained(digits_pipeline):
    """digits_pipeline + one short training run: (paths, TrainResult). Tests must not write into its folders;
    copy ``paths.models_dir`` (or use ``tmp_paths`` on a copy) to change anything."""
    from tasks.core.config import TrainConfig
    from tasks.train import loop

    p, *_ = digits_pipeline
    result = loop.run(TrainConfig(**DIGITS_TRAIN), p)
    return p, result


# ---------------------------------------------------------------- the reliability figures
# Reliability tests (marker `reliability`: tests/reliability and the trials that reuse a stage file's fixtures)
# call ``record(kind, **fields)`` for every trial or case they run. The rows go to
# ``$KEEL_RELIABILITY_DIR/<test file>.jsonl`` when that variable is set (``make reliability`` sets it, then
# renders docs/reliability.md from them with tests/reliability/render.py); a plain ``make test`` writes nothing.
RELIABILITY_DIR_ENV = "KEEL_RELIABILITY_DIR"


@pytest.fixture
def record(request):
    """``record(kind, **fields)``: one row (a trial or a case) of the figures in docs/reliability.md."""
    out_dir = os.environ.get(RELIABILITY_DIR_ENV)
    rows: list[dict] = []

    def _record(kind: str, **fields) -> dict:
        row = {"kind": kind, "test": request.node.name, **fields}
        rows.append(row)
        if out_dir:
            path = Path(out_dir) / f"{Path(str(request.node.path)).stem}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        return row

    _record.rows = rows
    return _record
