"""keel stability on digits: reseeds + perturbations on train/val only, a verdict with its reasons, the version tag."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core.config import Params, TrainConfig
from tasks.discipline import stability
from tests.conftest import DIGITS_TRAIN

REPO = Path(__file__).resolve().parents[2]
QUICK = {**DIGITS_TRAIN, "epochs": 3, "warmup_steps": 5}


def _params(p, root: Path, **stab) -> Params:
    paths = p.model_copy(update={"train_plots_dir": str(root / "reports" / "train")})
    return Params(paths=paths, train=TrainConfig(**QUICK), stability={"reseeds": 2, **stab})


def test_variants_follow_the_recipe():
    runs = dict(stability.variants(TrainConfig(**QUICK), 3, None))
    assert [runs[f"reseed {k}"].seed for k in range(3)] == [0, 1, 2]
    assert runs["shuffle"].seed == 0 and runs["shuffle"].shuffle_seed not in (None, 0)
    assert runs["batch x2"].batch_size == 128 and runs["batch x2"].lr == QUICK["lr"]  # the rule scales it
    assert runs["lr x1.1"].lr == pytest.approx(QUICK["lr"] * 1.1)


def test_judge_names_every_reason():
    def r(name, acc, curve):
        return stability.RunResult(name, 0, None, 64, 0.004, acc, 0.1, curve, stability._largest_dip(curve), 1.0)

    runs = [r("reseed 0", 0.95, [0.9, 0.95]), r("reseed 1", 0.96, [0.9, 0.96]), r("shuffle", 0.955, [0.9, 0.955]),
            r("batch x2", 0.90, [0.9, 0.90]), r("lr x1.1", 0.95, [0.95, 0.80, 0.95])]
    verdict, reasons, mean, std, deltas = stability.judge(runs, 2, 0.01, 0.02, 0.02)
    assert verdict == "fragile" and mean == pytest.approx(0.955) and std == pytest.approx(0.00707, abs=1e-5)
    assert deltas["batch x2"] == pytest.approx(-0.055)
    assert any(x.startswith("batch x2: val accuracy 0.9000 is 0.0550 below") for x in reasons)
    assert any(x.startswith("lr x1.1: val accuracy fell by 0.1500 between epochs") for x in reasons)
    assert not any("reseeds" in x for x in reasons)  # std 0.0071 <= 0.01
    assert stability.judge(runs[:3], 2, 0.01, 0.02, 0.02)[0] == "stable"


def test_stability_on_digits_writes_report_and_never_needs_test(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    shards = tmp_path / "shards"
    shutil.copytree(p.shards_dir, shards)
    shutil.rmtree(shards / "test")  # the test shards are gone: stability must not need them
    q = p.model_copy(update={"shards_dir": str(shards)})
    params = _params(q, tmp_path, max_reseed_std=0.0)  # any spread at all is "fragile": the gate can fail
    report = stability.run(params, root=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    names = [r.name for r in report.runs]
    assert names == ["reseed 0", "reseed 1", "shuffle", "batch x2", "lr x1.1"]
    assert all(0.3 < r.best_val_accuracy <= 1.0 and len(r.val_curve) == 3 for r in report.runs), report.runs
    assert len({r.best_val_accuracy for r in report.runs[:2]}) == 2  # different seeds, different results
    assert report.verdict == "fragile" and any("reseeds: std" in x for x in report.reasons)
    out = json.loads((tmp_path / "reports" / "stability.json").read_text())
    assert out["verdict"] == "fragile" and out["reseed_std"] > 0
    assert (tmp_path / "reports" / "stability.png").stat().st_size > 1000


def test_tags_the_registered_version(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    src = tmp_path / "model"
    src.mkdir()
    mv = client.create_model_version("m", str(src))
    client.set_registered_model_alias("m", "champion", mv.version)
    runs = [stability.RunResult(f"reseed {k}", k, None, 64, 0.004, 0.95 + k / 100, 0.1, [0.9, 0.95], 0.0, 1.0)
            for k in range(2)]
    report = stability.StabilityReport(*stability.judge(runs, 2, 0.001, 0.02, 0.02)[:4], runs, {}, {})
    params = Params(stability={"reseeds": 2, "model": "models:/m@champion"},
                    paths={"train_plots_dir": str(tmp_path / "reports" / "train")})
    assert stability._tag(params, report, tmp_path, tmp_path, uri) == "models:/m/1"
    tags = client.get_model_version("m", "1").tags
    assert tags["keel.stability"] == "fragile" and tags["keel.stability_val"] == "0.9550 ± 0.0071 over 2 reseeds"
    assert tags["keel.stability_reasons"].startswith("val accuracy varies over 2 reseeds")
    missing = Params(stability={"reseeds": 2, "model": "models:/m@nope"})
    with pytest.raises(stability.StabilityError, match=r"no registered model 'm' with alias @nope"):
        stability._tag(missing, report, tmp_path, tmp_path, uri)


def test_cli_errors_are_readable(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"paths": {"shards_dir": str(tmp_path / "nothing")}, "stability": {"reseeds": 2}}))
    r = subprocess.run([sys.executable, "-m", "tasks.cli", "stability", "--params", str(f)], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "keel stability: error:" in r.stderr and "nothing/index.json: no shards; run `dvc repro shard`" in r.stderr
    f.write_text(yaml.safe_dump({"stability": {"reseeds": 1}}))
    r = subprocess.run([sys.executable, "-m", "tasks.cli", "stability", "--params", str(f)], cwd=tmp_path,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "stability.reseeds: Input should be greater than or equal to 2" in r.stderr
