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
BIG_VAL = 10**7  # val items enough to resolve any threshold: the configured numbers apply as given
DIGITS_VAL = 185  # val items of builtin:digits with the default split

# The default recipe (params.yaml) measured on digits, CPU: the val curves of keel stability's six runs.
DEFAULT_RECIPE = {
    "reseed 0": [0.286, 0.708, 0.908, 0.892, 0.973, 0.989, 1.000, 0.984],
    "reseed 1": [0.135, 0.627, 0.757, 0.886, 0.935, 0.973, 0.973, 0.989],
    "reseed 2": [0.124, 0.795, 0.886, 0.908, 0.973, 0.978, 0.962, 0.978],
    "shuffle": [0.270, 0.746, 0.854, 0.876, 0.892, 0.935, 0.973, 0.984],
    "batch x2": [0.270, 0.173, 0.557, 0.611, 0.859, 0.957, 0.984, 0.984],
    "lr x1.1": [0.286, 0.697, 0.930, 0.897, 0.968, 0.973, 0.989, 0.978],
}


def _run(name: str, curve: list[float], acc: float | None = None) -> stability.RunResult:
    acc = max(curve) if acc is None else acc
    return stability.RunResult(name, 0, None, 64, 0.004, acc, 0.1, curve, stability._largest_dip(curve), 1.0)


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
    runs = [_run("reseed 0", [0.9, 0.95]), _run("reseed 1", [0.9, 0.96]), _run("shuffle", [0.9, 0.955]),
            _run("batch x2", [0.9, 0.90]), _run("lr x1.1", [0.95, 0.80, 0.95])]
    verdict, reasons, mean, std, deltas = stability.judge(runs, 2, 0.01, 0.02, 0.02, n_val=BIG_VAL)
    assert verdict == "fragile" and mean == pytest.approx(0.955) and std == pytest.approx(0.00707, abs=1e-5)
    assert deltas["batch x2"] == pytest.approx(-0.055)
    assert any(x.startswith("batch x2: val accuracy 0.9000 is 0.0550 below") for x in reasons)
    assert any(x.startswith("lr x1.1: val accuracy fell by 0.1500 at epoch 1 (0.9500 -> 0.8000)") for x in reasons)
    assert not any("reseeds" in x for x in reasons)  # std 0.0071 <= 0.01
    assert stability.judge(runs[:3], 2, 0.01, 0.02, 0.02, n_val=BIG_VAL)[0] == "stable"


def test_a_dip_counts_only_beyond_what_the_val_set_resolves():
    # 185 items, p about 0.95: 3 sqrt(2 p (1-p) / n) = 0.068, above max_val_dip 0.02; a huge val set: max_val_dip
    assert stability.dip_allowance(0.96, 0.94, DIGITS_VAL, 0.02) == pytest.approx(0.0680, abs=1e-4)
    assert stability.dip_allowance(0.96, 0.94, BIG_VAL, 0.02) == 0.02
    assert stability.dip_allowance(0.5, 0.5, DIGITS_VAL, 0.02) == pytest.approx(0.156, abs=1e-3)  # the most ever
    noisy = [0.70, 0.93, 0.897, 0.97, 0.978]  # 6 of 185 items lost at epoch 2: inside the noise
    collapse = [0.70, 0.93, 0.95, 0.75, 0.96]  # 37 items lost at epoch 3: a real collapse
    assert stability.falls(noisy, DIGITS_VAL, 0.02)[0][:2] == (2, pytest.approx(0.033))
    runs = [_run("reseed 0", noisy), _run("reseed 1", noisy), _run("lr x1.1", collapse)]
    verdict, reasons, *_ = stability.judge(runs, 2, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)
    assert verdict == "fragile" and len(reasons) == 1, reasons
    assert reasons[0] == ("lr x1.1: val accuracy fell by 0.2000 at epoch 3 (0.9500 -> 0.7500), more than the "
                          "0.1114 allowed (max_val_dip 0.02; z 3 on 185 val items)")
    # the same noise-sized dip on a val set that resolves it is a dip
    _, reasons, *_ = stability.judge(runs[:2], 2, 0.01, 0.02, 0.02, n_val=BIG_VAL)
    assert reasons == [f"reseed {k}: val accuracy fell by 0.0330 at epoch 2 (0.9300 -> 0.8970), more than the 0.0200 "
                       f"allowed (max_val_dip 0.02; z 3 on {BIG_VAL} val items)" for k in range(2)]


def test_reseed_spread_is_judged_at_the_val_sets_resolution():
    spread = [_run(f"reseed {k}", [0.5, v]) for k, v in enumerate([1.0, 0.9892, 0.9784])]  # 2 items apart each
    # 1.73 sqrt(m(1-m)/185) = 0.0132 at m = 0.9892: a std of 0.0108 is what val sampling alone gives 3 reseeds
    assert stability.reseed_std_allowance(0.9892, 3, DIGITS_VAL, 0.01) == pytest.approx(0.0132, abs=1e-4)
    assert stability.judge(spread, 3, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)[:2] == ("stable", [])
    _, reasons, *_ = stability.judge(spread, 3, 0.01, 0.02, 0.02, n_val=BIG_VAL)
    assert reasons == [("val accuracy varies over 3 reseeds: std 0.0108 > 0.0100 (max_reseed_std 0.01, or what "
                        f"{BIG_VAL} val items resolve) (1.0000, 0.9892, 0.9784)")]
    wide = [_run(f"reseed {k}", [0.5, v]) for k, v in enumerate([0.99, 0.95, 0.91])]  # a lucky seed: 15 items
    verdict, reasons, *_ = stability.judge(wide, 3, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)
    assert verdict == "fragile" and reasons[0].startswith("val accuracy varies over 3 reseeds: std 0.0400 > 0.0277")


def test_the_default_recipe_as_measured_is_stable_and_a_collapse_of_it_is_not():
    runs = [_run(name, curve) for name, curve in DEFAULT_RECIPE.items()]
    verdict, reasons, _, std, _ = stability.judge(runs, 3, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)
    assert (verdict, reasons) == ("stable", []) and std > 0.01  # 0.0108: two val items, inside the val noise
    collapsed = [*runs[:-1], _run("lr x1.1", [*DEFAULT_RECIPE["lr x1.1"][:6], 0.789, 0.978])]
    verdict, reasons, *_ = stability.judge(collapsed, 3, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)
    assert verdict == "fragile" and reasons[0].startswith("lr x1.1: val accuracy fell by 0.1840 at epoch 6"), reasons


def test_stability_on_digits_writes_report_and_never_needs_test(digits_pipeline, tmp_path):
    p, *_ = digits_pipeline
    shards = tmp_path / "shards"
    shutil.copytree(p.shards_dir, shards)
    shutil.rmtree(shards / "test")  # the test shards are gone: stability must not need them
    q = p.model_copy(update={"shards_dir": str(shards)})
    params = _params(q, tmp_path)
    report = stability.run(params, root=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    names = [r.name for r in report.runs]
    assert names == ["reseed 0", "reseed 1", "shuffle", "batch x2", "lr x1.1"]
    assert all(0.3 < r.best_val_accuracy <= 1.0 and len(r.val_curve) == 3 for r in report.runs), report.runs
    assert len({r.best_val_accuracy for r in report.runs[:2]}) == 2  # different seeds, different results
    n_val = sum(f["rows"] for f in json.loads((shards / "index.json").read_text())["splits"]["val"])
    assert report.thresholds["n_val"] == n_val and report.thresholds["dip_z"] == 3.0
    s = params.stability
    assert (report.verdict, report.reasons) == stability.judge(report.runs, 2, s.max_reseed_std, s.max_variant_drop,
                                                               s.max_val_dip, n_val=n_val)[:2]
    out = json.loads((tmp_path / "reports" / "stability.json").read_text())
    assert out["verdict"] == report.verdict and out["reseed_std"] > 0
    assert out["thresholds"]["reseed_std_allowed"] >= s.max_reseed_std
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
    report = stability.StabilityReport(*stability.judge(runs, 2, 0.001, 0.02, 0.02, n_val=BIG_VAL)[:4], runs, {}, {})
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


def _fragile_report() -> stability.StabilityReport:
    runs = [_run(name, curve) for name, curve in DEFAULT_RECIPE.items()]
    runs[-1] = _run("lr x1.1", [0.286, 0.697, 0.930, 0.700, 0.968, 0.989])
    return stability.StabilityReport(*stability.judge(runs, 3, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)[:4], runs, {}, {})


@pytest.mark.parametrize("report_only", [False, True])
def test_cli_fails_on_a_fragile_verdict_unless_report_only(tmp_path, monkeypatch, capsys, report_only):
    from tasks import cli

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"paths": {"train_plots_dir": str(tmp_path / "reports" / "train")}}))
    seen = []
    monkeypatch.setattr(stability, "run", lambda params: seen.append(params) or _fragile_report())
    rc = cli.main(["stability", "--params", str(f), *(["--report-only"] if report_only else [])])
    err = capsys.readouterr().err
    assert len(seen) == 1 and seen[0].paths.train_plots_dir == str(tmp_path / "reports" / "train")
    if report_only:
        assert rc == 0 and "error" not in err
        return
    assert rc == 1, err
    assert err.startswith("keel stability: error: verdict FRAGILE (1 reason(s)):\n  - lr x1.1: val accuracy fell by "
                          "0.2300 at epoch 3 (0.9300 -> 0.7000)"), err
    assert f"the numbers are in {tmp_path / 'reports' / 'stability.json'}" in err
    assert "`keel stability --report-only` reports without failing" in err


def test_cli_passes_a_stable_verdict(tmp_path, monkeypatch):
    from tasks import cli

    runs = [_run(name, curve) for name, curve in DEFAULT_RECIPE.items()]
    stable = stability.StabilityReport(*stability.judge(runs, 3, 0.01, 0.02, 0.02, n_val=DIGITS_VAL)[:4], runs, {}, {})
    monkeypatch.setattr(stability, "run", lambda params: stable)
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"stability": {"reseeds": 3}}))
    assert stable.verdict == "stable" and cli.main(["stability", "--params", str(f)]) == 0
