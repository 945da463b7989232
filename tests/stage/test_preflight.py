"""Train-stage preflight on the digits shards (CPU): all checks pass on a sane set-up; a mis-scaled head fails
initial_loss and a too-short overfit budget fails overfit_tiny_subset, each with numbers and what to do."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tasks import cli
from tasks.core import io
from tasks.core.config import ConfigError, Params, PreflightConfig, TrainConfig, load_params
from tasks.discipline import preflight
from tasks.discipline.preflight import checks_data, checks_model, checks_run, context
from tasks.model import build as tmodel

CFG = TrainConfig(model="resnet10t", batch_size=32)


def pf_paths(p, root: Path):
    return p.model_copy(update={"models_dir": str(root / "models"), "train_metrics": str(root / "metrics.json"),
                                "train_plots_dir": str(root / "reports" / "train"),
                                "checkpoints_dir": str(root / "checkpoints")})


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
    assert speed["device_busy_fraction"] > 0.7 and speed["goal_busy_fraction"] == 0.95

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
    skip = preflight.CheckItem
    monkeypatch.setattr(checks_model, "initial_loss", lambda ctx: skip("initial_loss", "skip", {}, ""))
    monkeypatch.setattr(checks_model, "overfit_tiny_subset", lambda ctx, s, n: skip("overfit", "skip", {}, ""))
    monkeypatch.setattr(checks_model, "input_pipeline_vs_step", lambda ctx: skip("speed", "skip", {}, ""))
    preflight.run(CFG, pf_paths(p, tmp_path))
    assert opened == ["train"]
    with pytest.raises(io.TestSplitAccessError):
        io.ShardReader(p.shards_dir, "test")


# ================================================================ the checklist (keel preflight)
def git_repo(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (root / "train.py").write_text("print('v1')\n")
    subprocess.run("git init -q && git add -A && git commit -qm init", cwd=root, shell=True, check=True, env=env)
    return root


def checklist_params(p, root: Path, **train) -> Params:
    return Params(paths=pf_paths(p, root), train=TrainConfig(**{"model": "resnet10t", "batch_size": 32, **train}),
                  preflight=PreflightConfig(subset=128))


@pytest.fixture(scope="module")
def full(digits_pipeline, tmp_path_factory):
    p, *_ = digits_pipeline
    root = tmp_path_factory.mktemp("checklist")
    repo = git_repo(root / "repo")
    os.environ.pop("KEEL_TRACKING", None)
    return preflight.checklist(checklist_params(p, root), root=repo), root


def test_checklist_passes_on_digits_with_evidence(full):
    report, root = full
    status = {i.name: i.status for i in report.items}
    assert list(status) == ["data_audit", "splits_frozen", "input_pipeline_vs_step", "initial_loss",
                            "overfit_tiny_subset", "pretrained_weights", "batch_lr_schedule", "logging_dry_step",
                            "checkpoint_selection", "reproducibility", "distributed"]
    assert status == {**{n: "pass" for n in status}, "pretrained_weights": "skip", "distributed": "skip"}, \
        report.to_json()
    assert report.passed
    audit = report.item("data_audit").evidence
    assert audit["classes"] == 10 and audit["label_sample_sheet_exists"] and "brightness" in audit["condition_features"]
    split = report.item("splits_frozen").evidence
    assert split["manifest_sha256"] == split["recorded_sha256"] and split["leakage_passed"] is True
    sched = report.item("batch_lr_schedule").evidence
    assert sched["scaled_lr"] == pytest.approx(TrainConfig().lr * 32 / 256) and sched["effective_batch"] == 32
    dry = report.item("logging_dry_step").evidence
    assert dry["tracker"].startswith("mlflow") and dry["run_id"]
    assert {"train_loss", "lr", "grad_norm", "val_accuracy"} <= dry["metrics_read_back"].keys()
    sel = report.item("checkpoint_selection").evidence
    assert sel["dry_step_best_pt"] and "run the whole schedule" in sel["policy"]
    rep = report.item("reproducibility").evidence
    assert rep["dirty_files"] == [] and len(rep["git_sha"]) == 40
    assert {"git_sha", "environment_hash", "shard_index_sha256", "config.seed"} <= set(rep["logged_with_the_run"])
    blob = json.loads((root / "reports" / "preflight.json").read_text())
    assert blob["passed"] is True and blob["stage"] == "checklist" and len(blob["items"]) == 11
    assert not list((root / "reports").glob(".*.tmp"))
    table = preflight.format_table(report)
    assert "1. data_audit" in table and "10. distributed" in table and "SKIP" in table


def test_dirty_tree_fails_reproducibility_naming_files(tmp_path):
    repo = git_repo(tmp_path / "repo")
    (repo / "train.py").write_text("print('v2')\n")
    item = checks_run.reproducibility(TrainConfig(), False, repo, None)
    assert item.status == "fail" and item.evidence["dirty_files"] == ["train.py"]
    assert "uncommitted changes to train.py" in item.what_to_do and "commit" in item.what_to_do
    assert "preflight.allow_dirty" in item.what_to_do
    allowed = checks_run.reproducibility(TrainConfig(), True, repo, None)
    assert allowed.status == "pass" and "allow_dirty" in allowed.what_to_do
    assert checks_run.reproducibility(TrainConfig(deterministic=False), True, repo, None).status == "fail"


def test_dvc_lock_written_by_dvc_repro_is_not_a_dirty_tree(tmp_path):
    """`dvc repro` rewrites dvc.lock before it runs train: train.preflight: true must not fail on that."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "dvc.lock").write_text("schema: '2.0'\n")
    repo = git_repo(tmp_path / "repo")  # commits dvc.lock with the code
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    item = checks_run.reproducibility(TrainConfig(), False, repo, None)
    assert item.status == "pass" and item.evidence["dirty_files"] == [], item.what_to_do
    (repo / "train.py").write_text("print('v2')\n")
    item = checks_run.reproducibility(TrainConfig(), False, repo, None)
    assert item.status == "fail" and item.evidence["dirty_files"] == ["train.py"]


def test_missing_or_altered_manifest_fails_splits(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    item = checks_data.splits_frozen(p.model_copy(update={"split_manifest": str(tmp_path / "nope.parquet")}))
    assert item.status == "fail" and "keel split" in item.what_to_do and item.evidence["manifest_exists"] is False
    m = tmp_path / "manifest.parquet"
    shutil.copy(p.split_manifest, m)
    (tmp_path / "manifest.parquet.sha256").write_text("0" * 64 + "  manifest.parquet\n")
    item = checks_data.splits_frozen(p.model_copy(update={"split_manifest": str(m)}))
    assert item.status == "fail" and "does not match its recorded hash" in item.what_to_do


def test_large_batch_without_warmup_fails_schedule():
    item = checks_run.batch_lr_schedule(TrainConfig(batch_size=128, effective_batch=4096, warmup_steps=0))
    assert item.status == "fail"
    assert item.evidence["scaled_lr"] == pytest.approx(TrainConfig().lr * 4096 / 256) and item.evidence["accumulation"] == 32
    assert "effective batch 4096" in item.what_to_do and "warmup_steps" in item.what_to_do
    floor = checks_run.batch_lr_schedule(TrainConfig(lr_floor=0.0))
    assert floor.status == "fail" and "lr_floor" in floor.what_to_do
    assert checks_run.batch_lr_schedule(TrainConfig(batch_size=128, effective_batch=4096, warmup_steps=500)).status == \
        "pass"


def test_distributed_item(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert checks_run.distributed(TrainConfig()).status == "skip"
    item = checks_run.distributed(TrainConfig(devices=2, device="cpu", batch_size=32, effective_batch=128))
    assert item.status == "pass" and item.evidence["backend"] == "gloo" and item.evidence["world_size"] == 2
    assert item.evidence["accumulation"] == 2
    monkeypatch.setenv("WORLD_SIZE", "6")  # three nodes of two: 128 is not a multiple of 32 x 6
    item = checks_run.distributed(TrainConfig(devices=2, device="cpu", batch_size=32, effective_batch=128))
    assert item.status == "fail" and "not a multiple" in item.what_to_do


def test_pretrained_weights_checked_against_fresh_init(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    other, _ = tmodel.build_model(TrainConfig(model="resnet10t"), 10, 3, 32)  # a different init = "pretrained"
    torch.save({"model": other.state_dict()}, tmp_path / "init.pt")
    cfg = TrainConfig(model="resnet10t", batch_size=32, pretrained="checkpoint", init_checkpoint=str(tmp_path / "init.pt"))
    _, ctx = context.prepare(cfg, pf_paths(p, tmp_path), 0.7, 0.95)
    item = checks_model.pretrained_weights(ctx)
    assert item.status == "pass" and item.evidence["tensors_changed_vs_fresh_init"] > 0
    # a "pretrained" file that is exactly the fresh init changes nothing: fail
    fresh = ctx.fresh_model(cfg.model_copy(update={"pretrained": "none", "init_checkpoint": None}))
    torch.save({"model": fresh.state_dict()}, tmp_path / "same.pt")
    _, ctx = context.prepare(cfg.model_copy(update={"init_checkpoint": str(tmp_path / "same.pt")}),
                                pf_paths(p, tmp_path), 0.7, 0.95)
    item = checks_model.pretrained_weights(ctx)
    assert item.status == "fail" and "not loaded" in item.what_to_do


def test_train_preflight_true_stops_training(digits_pipeline, tmp_path, monkeypatch, capsys):
    p, *_ = digits_pipeline
    repo = git_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("KEEL_TRACKING", "off")
    params = {"paths": pf_paths(p, tmp_path).model_dump(),
              "train": {"model": "resnet10t", "batch_size": 32, "effective_batch": 4096, "warmup_steps": 0,
                        "epochs": 1, "preflight": True},
              "preflight": {"subset": 32, "overfit_steps": 3, "dry_step": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = cli.main(["train", "--params", str(tmp_path / "params.yaml")])
    err = capsys.readouterr().err
    assert rc == 1 and "keel train: error: preflight failed:" in err and "6. batch_lr_schedule" in err
    assert "Traceback" not in err
    assert not (tmp_path / "models" / "best.pt").exists()  # training never started
    assert json.loads((tmp_path / "reports" / "preflight.json").read_text())["passed"] is False


def test_config_sections_are_typed(tmp_path):
    (tmp_path / "p.yaml").write_text("preflight:\n  allow_dirt: true\n")
    with pytest.raises(ConfigError, match="preflight.allow_dirt: unknown key"):
        load_params(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("preflight:\n  allow_dirty: true\nreproduce:\n  val_tolerance: 0.01\n")
    params = load_params(tmp_path / "p.yaml")
    assert params.preflight.allow_dirty and params.reproduce.val_tolerance == 0.01


def test_train_logs_the_passed_checklist_on_its_mlflow_run(digits_pipeline, tmp_path, monkeypatch):
    """The wiring, not the checks: when train.preflight is on, the report it passed lands on the training run."""
    from mlflow.tracking import MlflowClient

    from tasks.discipline import preflight as pf

    p, *_ = digits_pipeline
    paths = pf_paths(p, tmp_path)
    calls = []

    def passed(params, **_):
        calls.append(1)
        io.write_json(pf.report_path(params.paths), {"passed": True, "items": []})

    monkeypatch.setattr(pf, "require", passed)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("KEEL_TRACKING", raising=False)
    params = {"paths": paths.model_dump(), "train": {"model": "resnet10t", "batch_size": 32, "epochs": 1,
                                                     "max_steps": 2, "warmup_steps": 1, "preflight": True}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["train", "--params", str(tmp_path / "params.yaml")]) == 0 and calls == [1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("keel").experiment_id])[0]
    assert "preflight.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
