"""The default-job benchmark still runs end to end (--smoke: one epoch) and writes its JSON; no timing is asserted."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.benchrun import REPO, run_smoke

STAGE_KEYS = {"wall_s", "cpu_s", "cpu_cores", "server_cpu_s", "other_cores", "steal_cores", "returncode", "ran"}


@pytest.mark.slow
def test_default_job_smoke(tmp_path: Path) -> None:
    report = run_smoke("default_job.py", tmp_path, OMP_NUM_THREADS="1")
    assert report["status"] == "ok" and report["smoke"] is True
    assert report["params_overrides"]["train.epochs"] == 1
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(report["stages"]) == sorted(stages) == sorted(report["stage_order"])
    for name, s in report["stages"].items():
        assert STAGE_KEYS <= set(s), (name, s)
        assert s["returncode"] == 0 and s["ran"] is True, (name, s)
    assert {"wall_s", "cpu_s", "cpu_cores", "server_cpu_s", "other_cores"} <= set(report["total"])
    assert report["noop"]["returncode"] == 0 and report["noop"]["stages_ran"] == 0, report["noop"]
    train = report["train"]
    for key in ("images_per_s", "data_wait_fraction", "best_val_accuracy", "images_per_s_logged_windows",
                "data_wait_fraction_logged_windows", "images_per_s_stage_wall"):
        assert train[key] is not None, (key, train)
    assert 0.0 <= train["data_wait_fraction"] <= 1.0 and train["epochs_run"] == 1
    assert {"test_accuracy", "test_macro_f1"} <= set(report["test"])
    # one epoch is below register's gate: a gate_failed report, no champion, is the expected smoke outcome
    reg = report["register"]
    assert reg["status"] in ("gate_failed", "registered", "already_registered"), reg
    assert isinstance(reg["champion"], bool) and reg["champion"] == ("champion" in reg["aliases"])
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu_model"] is not None
    assert report["git"]["commit"] and report["date"] and report["versions"]["dvc"]
    assert "other_cores_whole_run" in report and report["omp_num_threads"] == "1"
