"""keel sweep's declaration checks (tasks.core.sweep.plan): every bad input is an error naming its key, and
the whole list comes before any trial runs; the CLI path is tested too (no study, no experiment made)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core import sweep as rules
from tasks.core.config import Params

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.unit


def _raw(**sweep) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweep"] = {**raw["sweep"], **sweep}
    return raw


def _plan(tmp_path: Path, **sweep) -> rules.Plan:
    raw = _raw(**sweep)
    return rules.plan(Params.model_validate(raw), raw, tmp_path)


def _problems(tmp_path: Path, **sweep) -> str:
    with pytest.raises(rules.SweepError) as e:
        _plan(tmp_path, **sweep)
    msg = str(e.value)
    assert msg.startswith("params.yaml: sweep: ") and "no trial was run" in msg, msg
    return msg


def test_the_shipped_sweep_plans(tmp_path):
    p = _plan(tmp_path)
    assert [d.key for d in p.dims] == ["train.lr", "train.weight_decay"]
    assert p.dims[0] == rules.Dim("train.lr", "float", 0.001, 0.01, True)
    assert (p.objective, p.intermediate, p.direction) == ("best_val_accuracy", "val_accuracy", "maximize")
    assert p.storage == f"sqlite:///{(tmp_path / 'data/sweeps/optuna.db').resolve()}"
    assert p.budget_s == 120 * 60 and p.concurrency == 2


def test_ints_stay_ints_and_choices_and_loss_minimises(tmp_path):
    p = _plan(tmp_path, objective="best_val_loss",
              space={"train.warmup_steps": {"low": 10, "high": 60}, "train.optimizer": {"choices": ["adamw", "sgd"]},
                     "train.lr": {"low": 0.001, "high": 0.01}})
    kinds = {d.key: d.kind for d in p.dims}
    assert kinds == {"train.warmup_steps": "int", "train.optimizer": "categorical", "train.lr": "float"}
    assert (p.intermediate, p.direction) == ("val_loss", "minimize")


def test_storage_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(rules.STORAGE_ENV, "postgresql://u:p@db:5432/optuna")
    assert _plan(tmp_path).storage == "postgresql://u:p@db:5432/optuna"
    assert not (tmp_path / "data").exists()


def test_an_unknown_param_is_named_with_the_closest_key(tmp_path):
    msg = _problems(tmp_path, space={"train.lrr": {"low": 0.001, "high": 0.01}})
    assert "sweep.space.train.lrr: unknown parameter train.lrr (no such key in params.yaml); did you mean train.lr?" in msg


def test_an_empty_space(tmp_path):
    msg = _problems(tmp_path, space={})
    assert "sweep.space is empty: name the params to search" in msg


def test_an_objective_that_reads_test(tmp_path):
    msg = _problems(tmp_path, objective="test_accuracy")
    assert "sweep.objective: test_accuracy is a test metric: a sweep chooses on validation" in msg
    assert "the test split is read once, for the winner" in msg


def test_a_budget_of_zero(tmp_path):
    assert "sweep.budget_minutes is 0: a budget of no time runs nothing" in _problems(tmp_path, budget_minutes=0)
    assert "sweep.n_trials is 0: a budget of no trials runs nothing" in _problems(tmp_path, n_trials=0)
    assert "sweep.concurrency is 0" in _problems(tmp_path, concurrency=0)


@pytest.mark.parametrize("space, expected", [
    ({"split.seed": {"low": 0, "high": 9}}, "sweep.space.split.seed: split.seed cannot be searched"),
    ({"evaluate.batch_size": {"choices": [256, 512]}}, "evaluate.batch_size cannot be searched"),
    ({"train": {"low": 0, "high": 1}}, "sweep.space.train: train cannot be searched"),
    ({"train.lr": {"low": 0.01, "high": 0.001}}, "sweep.space.train.lr: low (0.01) must be below high (0.001)"),
    ({"train.lr": {"low": 0.0, "high": 0.01, "log": True}}, "sweep.space.train.lr: a log range needs low > 0"),
    ({"train.lr": {"low": 0.001}}, "sweep.space.train.lr: needs low and high (a range) or choices (a list)"),
    ({"train.lr": {"choices": []}}, "sweep.space.train.lr: choices is empty"),
    ({"train.optimizer": {"low": 0, "high": 1}}, "train.optimizer is 'adamw' in params.yaml, not a number"),
])
def test_bad_ranges_name_the_key(tmp_path, space, expected):
    assert expected in _problems(tmp_path, space=space)


def test_every_problem_at_once_and_fixed_keys_checked(tmp_path):
    msg = _problems(tmp_path, space={"train.lrr": {"low": 1, "high": 2}}, objective="test_macro_f1", n_trials=0,
                    fixed={"train.epochss": 2})
    assert "4 problem(s)" in msg and "sweep.fixed.train.epochss: unknown parameter" in msg
    msg = _problems(tmp_path, fixed={"train.lr": 0.002})
    assert "sweep.fixed.train.lr: train.lr is also in sweep.space" in msg


def test_a_non_validation_objective_and_a_contrary_direction(tmp_path):
    msg = _problems(tmp_path, objective="images_per_s")
    assert "sweep.objective: images_per_s is not a validation metric of metrics/train.json" in msg
    msg = _problems(tmp_path, objective="best_val_loss", direction="maximize")
    assert "sweep.direction: maximize would choose the worst best_val_loss; use minimize or null" in msg


def test_overrides_are_dvc_exp_run_set_arguments():
    assert rules.overrides({"train.lr": 0.0031, "train.optimizer": "sgd"}, {"train.epochs": 2, "train.ema_decay": None,
                                                                             "train.compile": False}) == [
        "train.epochs=2", "train.ema_decay=null", "train.compile=false", "train.lr=0.0031", "train.optimizer=sgd"]


def _project(tmp_path: Path, **sweep) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(_raw(**sweep), sort_keys=False))
    return root


@pytest.mark.parametrize("sweep, expected", [
    ({"space": {"train.lrr": {"low": 0.001, "high": 0.01}}}, "unknown parameter train.lrr"),
    ({"space": {}}, "sweep.space is empty"),
    ({"objective": "test_accuracy"}, "test_accuracy is a test metric"),
    ({"budget_minutes": 0}, "sweep.budget_minutes is 0"),
    # a range keel's schema refuses (train.label_smoothing must be < 1): caught on a copy of params.yaml
    ({"space": {"train.label_smoothing": {"low": 0.0, "high": 1.5}}},
     "a trial with {'train.label_smoothing': 1.5} would be refused"),
])
def test_keel_sweep_refuses_before_any_trial(tmp_path, sweep, expected):
    root = _project(tmp_path, **sweep)
    r = subprocess.run([sys.executable, "-m", "tasks.cli", "sweep"], check=False, cwd=root, capture_output=True, text=True,
                       env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.startswith("keel sweep: error: params.yaml: sweep:") and expected in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in root.iterdir()) == ["dvc.yaml", "params.yaml"]  # no study, no lock, no report


def test_a_study_of_another_commit_or_objective_is_not_resumed(tmp_path):
    import logging

    from flows import sweep as flow
    from flows.errors import FlowError

    plan = _plan(tmp_path)
    plan = rules.Plan(**{**plan.__dict__, "storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
    log = logging.getLogger("test")
    study = flow._open_study(plan, "a" * 40, fresh=False, log=log)
    assert study.user_attrs["commit"] == "a" * 40 and len(study.user_attrs["tag"]) == 4
    assert flow._open_study(plan, "a" * 40, fresh=False, log=log).user_attrs == study.user_attrs  # resumed
    with pytest.raises(FlowError, match=r"study 'keel-sweep' was run on commit aaaaaaaaaa, this is bbbbbbbbbb: its "
                                        r"trials are experiments of that commit"):
        flow._open_study(plan, "b" * 40, fresh=False, log=log)
    other = rules.Plan(**{**plan.__dict__, "objective": "best_val_loss", "direction": "minimize"})
    with pytest.raises(FlowError, match=r"optimised best_val_accuracy \(maximize\); params.yaml now says "
                                        r"best_val_loss \(minimize\)"):
        flow._open_study(other, "a" * 40, fresh=False, log=log)
    assert flow._open_study(plan, "b" * 40, fresh=True, log=log).user_attrs["commit"] == "b" * 40  # --fresh


def test_a_resumed_study_draws_new_params_not_the_first_runs_again(tmp_path):
    """A sweep killed after its first draws and run again must not propose those params again (seeded with
    sweep.seed alone, it did: CI saw a 'new' trial equal to trial 1, restored from DVC's run-cache)."""
    import logging

    import optuna

    from flows import sweep as flow

    space = {"lr": optuna.distributions.FloatDistribution(0.001, 0.01, log=True),
             "ls": optuna.distributions.FloatDistribution(0.0, 0.1)}
    log = logging.getLogger("test")
    for sampler in ("tpe", "random"):
        plan = _plan(tmp_path)
        plan = rules.Plan(**{**plan.__dict__, "sampler": sampler, "study": f"s-{sampler}",
                             "storage": f"sqlite:///{tmp_path / 'optuna.db'}"})
        first = flow._open_study(plan, "a" * 40, fresh=False, log=log)
        drawn = []
        for _ in range(2):
            t = first.ask(space)
            drawn.append(t.params)
            first.tell(t, 0.5)
        resumed = flow._open_study(plan, "a" * 40, fresh=False, log=log)
        again = resumed.ask(space).params
        assert again not in drawn, (sampler, again, drawn)
        # the same seed still gives the same sweep: a fresh study draws the first run's params again
        fresh = flow._open_study(plan, "a" * 40, fresh=True, log=log)
        assert fresh.ask(space).params == drawn[0], sampler


def test_one_sweep_drives_a_study_at_a_time(tmp_path):
    from flows import sweep as flow
    from flows.errors import FlowError

    busy = r"another keel sweep is driving study 's' \(PID \d+, lock .*s.lock\)"
    with flow._one_driver(tmp_path, "s"), pytest.raises(FlowError, match=busy), flow._one_driver(tmp_path, "s"):
        pass
    with flow._one_driver(tmp_path, "s"):  # released: the next one may
        pass


# ---------------------------------------------------------------------------------------------------------------
# trials as jobs (flows/sweep_trial.py): the code a study runs, the trial's copy, promoting a job trial


def _code_tree(dest: Path) -> Path:
    """The files a trial copy takes from a project (flows.workspace.FILES / FOLDERS), no .git."""
    from flows.workspace import FILES, FOLDERS

    for rel in FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, dest / rel)
    for rel in FOLDERS:
        shutil.copytree(REPO / rel, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_code_rev_is_the_commit_or_a_hash_of_the_code(tmp_path):
    from flows.sweep_trial import code_rev

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert code_rev(REPO) == head
    ws = _code_tree(tmp_path / "ws")          # the cluster's workspace: no .git
    rev = code_rev(ws)
    assert rev.startswith("tree-") and len(rev) == 21 and code_rev(ws) == rev
    (ws / "data").mkdir()
    (ws / "data/anything.bin").write_bytes(b"outputs do not count")
    assert code_rev(ws) == rev
    with open(ws / "tasks/train/__init__.py", "a") as fh:
        fh.write("\n# a change of code\n")
    assert code_rev(ws) != rev


def test_a_trial_copy_shares_the_projects_cache_and_is_made_once(tmp_path):
    from configobj import ConfigObj

    from flows.workspace import WorkspaceError, trial_copy

    ws = _code_tree(tmp_path / "ws")
    (ws / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    copy = ws / ".dvc/tmp/keel-trials/t1"
    trial_copy(ws, copy, ws / ".dvc/cache")
    assert (copy / "dvc.lock").read_text() == (ws / "dvc.lock").read_text()
    assert (copy / "tasks/train/__init__.py").read_bytes() == (ws / "tasks/train/__init__.py").read_bytes()
    conf = ConfigObj(str(copy / ".dvc/config.local"))
    assert conf["core"]["no_scm"] == "true" and conf["cache"]["dir"] == str(ws / ".dvc/cache")
    with pytest.raises(WorkspaceError, match=r"t1: exists already \(a trial's copy is made once"):
        trial_copy(ws, copy, ws / ".dvc/cache")


def test_promoting_a_job_trial_applies_its_overrides_or_refuses_naming_the_key(tmp_path):
    from tasks.discipline.promote import PromoteError, _apply_sets

    (tmp_path / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    before = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(PromoteError) as e:
        _apply_sets(tmp_path, ["train.lr=0.004", "train.label_smoothing=1.5"], "keel-sweep-ab12-t3")
    msg = str(e.value)
    assert "the overrides of keel-sweep-ab12-t3 (train.lr=0.004 train.label_smoothing=1.5) do not apply" in msg
    assert "label_smoothing" in msg and "less than 1" in msg, msg
    assert (tmp_path / "params.yaml").read_bytes() == before
    _apply_sets(tmp_path, ["train.lr=0.004"], "keel-sweep-ab12-t3")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["lr"] == 0.004


def test_a_sweep_report_names_a_job_trial_and_its_overrides(tmp_path):
    import json

    from tasks.discipline.promote import PromoteError, _sweep_trial

    report = {"study": "s", "objective": "best_val_accuracy", "direction": "maximize", "compared_on_validation": 2,
              "trials_on": "keel-sweep-trial/keel-gpu-sweep-trial",
              "trials": [{"number": 1, "state": "COMPLETE", "value": 0.9, "experiment": "s-ab-t1",
                          "sets": ["train.lr=0.004"], "trials_on": "keel-sweep-trial/keel-gpu-sweep-trial"},
                         {"number": 2, "state": "FAIL", "value": None, "experiment": "s-ab-t2", "sets": []}]}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(report))
    t = _sweep_trial(path, "s-ab-t1")
    assert t["trials_on"] == "keel-sweep-trial/keel-gpu-sweep-trial" and t["sets"] == ["train.lr=0.004"]
    assert t["compared"] == 2 and t["trial"] == 1
    with pytest.raises(PromoteError, match="s-ab-t2 is not a complete trial of sweep 's'"):
        _sweep_trial(path, "s-ab-t2")


def test_a_job_trial_gets_the_study_storage_from_its_own_configuration_not_from_the_api(tmp_path, monkeypatch):
    import json

    from flows.sweep_trial import HOME_ENV, TRIAL_ENV, _trial_env, job_environment

    secret = "postgresql+psycopg2://keel:s3cret@db:5432/optuna"
    spec = {"storage": secret, "study": "s", "trial_id": 7, "intermediate": "val_accuracy", "startup_trials": 1,
            "warmup_epochs": 1}
    param = job_environment({"KEEL_RUN_TAGS": "{}"}, spec)
    assert "s3cret" not in json.dumps(param) and json.loads(param[TRIAL_ENV])["trial_id"] == 7
    ws = _code_tree(tmp_path / "ws")
    monkeypatch.setenv("KEEL_SWEEP_STORAGE", secret)   # the pod's configuration (the cluster: keel-env + Secret)
    env = _trial_env(ws, ws / ".dvc/tmp/keel-trials/t7", param)
    assert json.loads(env[TRIAL_ENV]) == spec and env[HOME_ENV] == str(ws)
    assert job_environment({}, None) == {} and TRIAL_ENV not in _trial_env(ws, ws, {})


def test_a_resumed_sweep_ends_the_interrupted_trials_runs_killed(tmp_path, monkeypatch):
    """A killed sweep leaves its running trials' MLflow runs RUNNING; the resume ends those (and only those) KILLED."""
    import logging
    from types import SimpleNamespace

    from mlflow import MlflowClient

    from flows import sweep as flow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(flow, "_tracking_uri", lambda root: uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("keel", artifact_location=str(tmp_path / "art"))
    parent = client.create_run(exp, tags={"keel.stage": "sweep"}).info.run_id
    runs = {n: client.create_run(exp, tags={"mlflow.parentRunId": parent, "keel.trial": str(n)}).info.run_id
            for n in (1, 2, 3)}
    client.set_terminated(runs[3], "FINISHED")
    other = client.create_run(exp, tags={"keel.trial": "2"}).info.run_id   # another sweep's trial 2: not ours
    flow._end_interrupted_runs(tmp_path, parent, [SimpleNamespace(number=2), SimpleNamespace(number=3)],
                               logging.getLogger("test"))
    status = {n: client.get_run(r).info.status for n, r in runs.items()}
    assert status == {1: "RUNNING", 2: "KILLED", 3: "FINISHED"}, status
    assert client.get_run(runs[2]).data.tags["keel.sweep.interrupted"] == "true"
    assert client.get_run(other).info.status == "RUNNING"
