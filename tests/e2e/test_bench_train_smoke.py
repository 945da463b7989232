"""The training-throughput benchmark still runs end to end (tiny synthetic shards); its timings are never asserted on."""
from __future__ import annotations

from pathlib import Path

from tests.support.benchrun import run_smoke


def test_train_throughput_smoke(tmp_path: Path) -> None:
    report = run_smoke("train_throughput.py", tmp_path, KEEL_TRACKING="off")
    ceiling, real = report["ceiling"], report["real"]
    assert ceiling["status"] == "ok" and ceiling["images_per_s"] > 0, ceiling
    assert real["status"] == "ok" and real["images_per_s"] > 0, real
    assert 0.0 <= real["data_wait_fraction"] <= 1.0, real
    assert report["ratio"] == real["images_per_s"] / ceiling["images_per_s"]
    # the loop really ran its 5 steps, logged a window per step, and the warm-up window was dropped
    run = report["real_runs"][0]
    assert [w["step"] for w in run["windows"]] == [1, 2, 3, 4, 5]
    assert run["windows_used"] == 4 and run["steps_used"] == 4
    assert run["train_config"]["model"] == "resnet10t" and run["train_config"]["max_steps"] == 5
    s = report["settings"]
    assert (s["model"], s["resolution"], s["batch_size"], s["steps"]) == ("resnet10t", 32, 16, 5)
    assert report["synthetic_shards"]["train"] == 256
    assert report["git"]["commit"] and report["versions"]["torch"] and report["device"]
