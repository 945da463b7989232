"""Train-stage preflight on the digits shards (CPU): all checks pass on a sane set-up; a mis-scaled head fails
initial_loss and a too-short overfit budget fails overfit_tiny_subset, each with numbers and what to do."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tasks import io, preflight
from tasks.config import TrainConfig
from tasks.train import model as tmodel

CFG = TrainConfig(model="resnet10t", batch_size=32)


def pf_paths(p, root: Path):
    return p.model_copy(update={"models_dir": str(root / "models"), "train_metrics": str(root / "metrics.json"),
                                "train_plots_dir": str(root / "reports" / "train")})


@pytest.fixture(scope="module")
def good(digits_pipeline, tmp_path_factory):
    p, *_ = digits_pipeline
    root = tmp_path_factory.mktemp("preflight")
    return preflight.run(CFG, pf_paths(p, root)), root


def test_all_checks_pass_on_digits(good, capsys):
    report, root = good
    assert [i.name for i in report.items] == ["initial_loss", "overfit_tiny_subset", "input_pipeline_vs_step"]
    assert report.passed and all(i.status == "pass" for i in report.items), report.to_json()
    init = report.item("initial_loss").evidence
    assert init["expected_ln_num_classes"] == pytest.approx(math.log(10), abs=1e-3)
    assert abs(init["mean_loss"] - math.log(10)) / math.log(10) <= 0.25
    fit = report.item("overfit_tiny_subset").evidence
    assert fit["subset"] == 256 and 1 <= fit["steps"] <= 150
    assert fit["loss_end"] < fit["loss_start"]
    assert fit["loss_end"] < 0.05 or fit["accuracy_end"] >= 0.99
    speed = report.item("input_pipeline_vs_step").evidence
    assert speed["pipeline_ms_per_batch"] > 0 and speed["step_ms_per_batch"] > 0
    assert speed["ratio_pipeline_over_step"] < 1

    # the report on disk, beside the train plots dir, with the same content
    blob = json.loads((root / "reports" / "preflight_train.json").read_text())
    assert blob["passed"] is True and blob["stage"] == "train"
    assert [(i["name"], i["status"]) for i in blob["items"]] == [(i.name, i.status) for i in report.items]
    assert {"evidence", "what_to_do"} <= blob["items"][0].keys()
    assert not list((root / "reports").glob(".*.tmp"))  # atomic write left nothing behind

    table = preflight.format_table(report)
    for name in ("initial_loss", "overfit_tiny_subset", "input_pipeline_vs_step", "PASS", "what to do"):
        assert name in table


def test_mis_scaled_head_fails_initial_loss(digits_pipeline, tmp_path, monkeypatch):
    p, *_ = digits_pipeline
    real = tmodel.build_model

    def loud_head(*a, **kw):
        model, rep = real(*a, **kw)
        with torch.no_grad():
            model.get_classifier().weight.mul_(100)
        return model, rep

    monkeypatch.setattr(tmodel, "build_model", loud_head)
    report = preflight.run(CFG, pf_paths(p, tmp_path), subset=64, overfit_steps=1)
    item = report.item("initial_loss")
    assert item.status == "fail" and not report.passed
    assert item.evidence["mean_loss"] > 1.25 * math.log(10)
    assert item.evidence["relative_deviation"] > 0.25
    assert "head" in item.what_to_do and "init" in item.what_to_do and "label mapping" in item.what_to_do
    blob = json.loads((tmp_path / "reports" / "preflight_train.json").read_text())
    assert blob["passed"] is False and blob["items"][0]["status"] == "fail"


def test_overfit_with_one_step_fails_with_evidence(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    report = preflight.run(CFG, pf_paths(p, tmp_path), subset=64, overfit_steps=1)
    assert report.item("initial_loss").status == "pass"
    item = report.item("overfit_tiny_subset")
    assert item.status == "fail"
    ev = item.evidence
    assert ev["steps"] == 1 and ev["max_steps"] == 1 and ev["subset"] == 64
    assert ev["loss_end"] > 0.05 and ev["accuracy_end"] < 0.99
    assert ev["loss_start"] == pytest.approx(math.log(10), rel=0.25)
    assert "did not memorise 64" in item.what_to_do and "overfit_steps" in item.what_to_do


def test_never_reads_the_test_split(digits_pipeline, tmp_path, monkeypatch):
    p, *_ = digits_pipeline
    opened = []
    orig = io.ShardReader.__init__

    def spy(self, shards_dir, split, **kw):
        opened.append(split)
        orig(self, shards_dir, split, **kw)

    monkeypatch.setattr(io.ShardReader, "__init__", spy)
    monkeypatch.setattr(preflight, "_initial_loss", lambda ctx: preflight.CheckItem("initial_loss", "skip", {}, ""))
    monkeypatch.setattr(preflight, "_overfit", lambda ctx, s, n: preflight.CheckItem("overfit", "skip", {}, ""))
    monkeypatch.setattr(preflight, "_pipeline_vs_step", lambda ctx: preflight.CheckItem("speed", "skip", {}, ""))
    preflight.run(CFG, pf_paths(p, tmp_path))
    assert opened == ["train"]
    with pytest.raises(io.TestSplitAccessError):
        io.ShardReader(p.shards_dir, "test")
