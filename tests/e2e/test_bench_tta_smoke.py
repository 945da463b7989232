"""The time-to-accuracy benchmark still runs end to end on a tiny synthetic set; its timings are never asserted on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.benchrun import REPO, run_smoke


def test_time_to_accuracy_smoke(tmp_path: Path) -> None:
    report = run_smoke("time_to_accuracy.py", tmp_path, "--peer-workers", "1", KEEL_TRACKING="off",
                       OMP_NUM_THREADS="1")
    keel, peer = report["keel"], report["peer"]
    # the recipe went through all five stages, and the test split was read exactly once, by evaluate
    assert set(keel["data_prep_s"]) == {"ingest", "split", "validate", "shard"}
    assert keel["test_reads"] == 1 and keel["test_decision"] == "read"
    assert keel["epochs"] == peer["epochs"] == 2 and len(keel["val_curve"]) == len(peer["val_curve"]) == 2
    for arm in (keel, peer):
        assert arm["train_s"] > 0 and 0.0 <= arm["test_accuracy"] <= 1.0
    assert report["train_config"]["model"] == "keel_cifar_net_s" and report["train_config"]["compile"] is False
    assert report["keel_over_peer_train_time"] == round(keel["train_s"] / peer["train_s"], 4)
    assert "train.epochs=2" in report["overrides"] and report["recipe"] == "bench/recipes/cifar10.yaml"


def test_time_to_accuracy_rejects_a_bad_override(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(REPO / "bench" / "time_to_accuracy.py"), "--smoke", "--no-peer",
                        "--out", str(tmp_path / "x.json"), "--workdir", str(tmp_path / "work"), "--set", "epochs=3"],
                       cwd=REPO, env=dict(os.environ, KEEL_TRACKING="off"), capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode != 0 and "--set 'epochs=3': expected SECTION.KEY=VALUE" in r.stderr, r.stderr[-2000:]
