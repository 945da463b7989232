"""``keel sweep``: the command. The search itself is the Prefect flow ``keel-sweep`` (flows/sweep.py), started as
its own process, so tasks/ never imports Prefect or flows; its declaration's checks are tasks.core.sweep. The
flow's process prints ``keel sweep: error: ...`` and exits 1 on a sweep that cannot run; that status is this
command's."""
from __future__ import annotations

import subprocess
import sys


def main(promote: bool = True, fresh: bool = False, trials_on: str | None = None) -> None:
    cmd = [sys.executable, "-m", "flows.sweep"] + ([] if promote else ["--no-promote"]) + (["--fresh"] if fresh else [])
    if trials_on:
        cmd += ["--trials-on", trials_on]
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
        raise SystemExit(rc)
