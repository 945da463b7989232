"""The flow-overhead benchmark still runs end to end (--smoke: one no-op repeat, ephemeral API, one training
epoch in the untimed first build, so the flow runs end GateFailed, as expected) and writes its JSON; no timing
is asserted."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.benchrun import run_smoke


@pytest.mark.slow
def test_flow_overhead_smoke(tmp_path: Path) -> None:
    report = run_smoke("flow_overhead.py", tmp_path, OMP_NUM_THREADS="1")
    assert report["smoke"] is True and report["repeat"] == 1
    assert report["params_overrides"]["train.epochs"] == 1
    assert {(r["mode"], r["arm"]) for r in report["runs"]} == {("noop", "dvc"), ("noop", "ephemeral")}
    for run in report["runs"]:
        assert {"wall_s", "cpu_s", "other_cores", "stages_ran"} <= set(run), run
        assert run["stages_ran"] == 0, run
    # one epoch is below register's gate: the flow run ends GateFailed (exit 3), which the bench expects and records
    [flow_run] = [r for r in report["runs"] if r["arm"] == "ephemeral"]
    assert flow_run["flow_state"] == "GateFailed", flow_run
    noop = report["summary"]["noop"]
    assert {"wall_s", "cpu_s", "n"} <= set(noop["dvc"])
    assert {"wall_s", "cpu_s", "overhead_wall_s", "overhead_cpu_s", "split", "per_stage"} <= set(noop["ephemeral"])
    assert report["machine"]["nproc"] >= 1 and report["git"] and report["date"]
