"""Run a bench/ script at its smoke size and return its JSON: the benches' CI smoke tests share this."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_smoke(script: str, tmp_path: Path, *args: str, timeout: int = 600, **env: str) -> dict:
    """``python bench/<script> --smoke --out ... --workdir ... *args``; asserts exit 0 (with the output tail in the
    message) and returns the JSON report. Timings in it are never asserted on: the machine is shared."""
    out = tmp_path / "x.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", "--out", str(out),
                        "--workdir", str(tmp_path / "work"), *args],
                       cwd=REPO, env=dict(os.environ, DO_NOT_TRACK="1", **env), capture_output=True, text=True,
                       timeout=timeout, check=False)
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    return json.loads(out.read_text())
