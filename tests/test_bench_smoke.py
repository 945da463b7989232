"""The data-stage benchmark still runs end to end (tiny synthetic set); its timings are never asserted on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "split", "validate", "shard")


def test_data_stages_smoke(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    env = dict(os.environ, DO_NOT_TRACK="1")
    r = subprocess.run([sys.executable, str(REPO / "bench" / "data_stages.py"), "--smoke", "--out", str(out),
                        "--workdir", str(tmp_path / "work")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, \
        f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert set(STAGES) <= set(report["stages"]), sorted(report["stages"])
    for name in ("ingest", "split", "shard"):
        stage = report["stages"][name]
        assert stage["status"] == "ok", (name, stage)
        assert stage["items"] == report["n"] > 0, (name, stage["items"], report["n"])
        assert stage["wall_s"] > 0 and stage["peak_rss_tree_mb"] > 0
    # validate may be skipped (module absent) or its gate may say no on 200 items; it must not crash
    validate = report["stages"]["validate"]
    assert validate["status"] in ("ok", "gate_failed", "skipped"), validate
    assert report["baseline"]["status"] == "ok" and report["baseline"]["items"] == report["n"]
    assert report["machine"]["nproc"] >= 1 and report["git"]["commit"]
