"""No checkpoint is ever unpickled: a malicious pickle planted as the init checkpoint, as last.pt or as best.pt is
refused with a message naming the file, and its payload never runs. keel's own checkpoints load safely."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tasks import evaluate
from tasks.core import checkpoint
from tasks.core.config import EvaluateConfig, TrainConfig
from tasks.evaluate import EvaluateError
from tasks.model.build import ModelConfigError
from tasks.register.candidate import load_candidate
from tasks.register.records import RegisterError
from tasks.serving import ImageClassifier
from tasks.train import loop

FAST = {"model": "resnet10t", "epochs": 1, "batch_size": 32, "warmup_steps": 5, "lr": 0.004, "log_every_steps": 1}


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker``: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant(path: Path, marker: Path) -> Path:
    """A file that looks like a keel checkpoint (tensors under "model") with a payload beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.ones(2)}, "index": {}, "run_info": {"config": {}}, "x": _Payload(marker)}, path)
    return path


def refused(message: str, path: Path) -> None:
    assert str(path) in message and "refused to load" in message
    assert "system" in message  # torch names the global the file tried to call
    assert "weights_only=False" not in message  # never advise the unsafe way out


def test_the_loader_refuses_a_pickle_and_never_runs_it(tmp_path):
    marker = tmp_path / "ran"
    bad = plant(tmp_path / "bad.pt", marker)
    with pytest.raises(checkpoint.UnsafeCheckpointError) as e:
        checkpoint.load(bad)
    refused(str(e.value), bad)
    assert not marker.exists()
    # the control: unpickling the same file does run the payload, so the assertion above can fail
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_keels_own_checkpoints_load_safely(digits_trained):
    p, _ = digits_trained
    for name in ("best.pt", "last.pt"):
        blob = torch.load(Path(p.models_dir) / name, map_location="cpu", weights_only=True)
        assert blob["model"]
    last = torch.load(Path(p.models_dir) / "last.pt", map_location="cpu", weights_only=True)
    assert isinstance(last["rng"]["numpy"]["key"], torch.Tensor) and last["rng"]["numpy"]["key"].numel() == 624


def test_init_checkpoint_refused(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    marker = tmp_path / "ran"
    bad = plant(tmp_path / "init.pt", marker)
    cfg = TrainConfig(**FAST, pretrained="checkpoint", init_checkpoint=str(bad))
    out = p.model_copy(update={"models_dir": str(tmp_path / "models"), "train_metrics": str(tmp_path / "m.json"),
                               "train_plots_dir": str(tmp_path / "reports"),
                               "checkpoints_dir": str(tmp_path / "checkpoints")})
    with pytest.raises(ModelConfigError) as e:
        loop.run(cfg, out)
    assert str(e.value).startswith("train.init_checkpoint: ")
    refused(str(e.value), bad)
    assert not marker.exists()
    assert not (tmp_path / "models" / "best.pt").exists()


def test_last_pt_refused_on_resume(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    marker = tmp_path / "ran"
    bad = plant(tmp_path / "checkpoints" / "last.pt", marker)
    out = p.model_copy(update={"models_dir": str(tmp_path / "models"), "train_metrics": str(tmp_path / "m.json"),
                               "train_plots_dir": str(tmp_path / "reports"),
                               "checkpoints_dir": str(tmp_path / "checkpoints")})
    with pytest.raises(checkpoint.UnsafeCheckpointError) as e:
        loop.run(TrainConfig(**FAST), out)
    refused(str(e.value), bad)
    assert "resume checkpoint" in str(e.value)
    assert not marker.exists()
    assert bad.exists()  # left for the user to look at, not overwritten by a fresh run
    assert not (tmp_path / "models" / "best.pt").exists()


def test_best_pt_refused_by_evaluate_register_and_serving(digits_trained, tmp_path):
    p, _ = digits_trained
    marker = tmp_path / "ran"
    models = tmp_path / "models"
    bad = plant(models / "best.pt", marker)
    ep = p.model_copy(update={"models_dir": str(models), "test_ledger": str(tmp_path / "ledger"),
                              "evaluate_dir": str(tmp_path / "evaluate"),
                              "test_metrics": str(tmp_path / "metrics" / "test.json")})
    with pytest.raises(EvaluateError) as e:
        evaluate.run(EvaluateConfig(), ep)
    refused(str(e.value), bad)
    assert not Path(ep.test_metrics).exists()  # no look taken, no result written
    assert not (tmp_path / "ledger").exists() or not any((tmp_path / "ledger").iterdir())
    with pytest.raises(RegisterError) as e:
        load_candidate(ep)
    refused(str(e.value), bad)
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    with pytest.raises(checkpoint.UnsafeCheckpointError) as e:
        ImageClassifier.from_files(bad, spec)
    refused(str(e.value), bad)
    assert not marker.exists()
    shutil.rmtree(models)
