"""keel sweep on digits, end to end: an Optuna study of 4 trials (a small space, 2 epochs), 2 at once, as the Prefect
flow keel-sweep whose trials are `dvc exp run --temp train` experiments.

One test, in the order a user lives it: a trial made to fail (its params are refused by keel) does not stop the
sweep; the sweep is killed (SIGKILL, its whole process group) while trials run; run again, it resumes from its
study: finished trials are not rerun, the interrupted ones run again with the same params; the best trial is
promoted: exactly one test read, one registered version tagged with the sweep, the trial and the number of trials
compared on validation. The trials overlapped in time; the sweep's MLflow run has every trial's run nested under
it; Prefect has the flow runs and one task run per trial."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.e2e.test_pipeline import _env, trained_baseline
from tests.support.mlflow_server import group_alive
from tests.support.procs import log_tail

pytestmark = pytest.mark.slow

FAST = {"ingest": {"workers": 1}, "shard": {"workers": 1},
        "train": {"epochs": 2, "warmup_steps": 10},
        "register": {"min_val_accuracy": 0.3, "min_test_accuracy": 0.3, "min_test_macro_f1": 0.3},
        "sweep": {"n_trials": 4, "concurrency": 2, "budget_minutes": 30,
                  "space": {"train.lr": {"low": 0.001, "high": 0.01, "log": True},
                            "train.label_smoothing": {"low": 0.0, "high": 0.1}},
                  # one completed trial before any is pruned: the test sees pruning without waiting for many
                  "pruning": {"enabled": True, "startup_trials": 1, "warmup_epochs": 1}}}
BAD = {"train.lr": 0.004, "train.label_smoothing": 1.5}   # keel refuses label_smoothing >= 1


def _sweep_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in _env().items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "KEEL_SWEEP"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", OMP_NUM_THREADS="1")
    return env


def _study(root: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="keel-sweep", storage=f"sqlite:///{root / 'data/sweeps/optuna.db'}")


def _ledger(root: Path) -> list[dict]:
    f = root / "data/test_ledger/ledger.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    return trained_baseline(base / "keel", FAST, {"OMP_NUM_THREADS": "1"}), base


def test_sweep_fails_a_trial_survives_a_kill_resumes_and_promotes_one(project):
    import optuna

    root, base = project
    env = _sweep_env(base / "prefect-home")
    keel = str(Path(sys.executable).parent / "keel")
    # a trial whose params keel refuses, queued first: the study exists before the sweep (as a user's enqueue would)
    (root / "data/sweeps").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="keel-sweep", storage=f"sqlite:///{root / 'data/sweeps/optuna.db'}",
                                direction="maximize")
    study.enqueue_trial(BAD)

    # 1) the sweep, killed as soon as one trial has completed (the next ones are running then)
    log1 = base / "sweep1.log"
    with open(log1, "wb") as fh:
        proc = subprocess.Popen([keel, "sweep", "--no-promote"], cwd=root, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while True:
        states = [t.state for t in _study(root).get_trials(deepcopy=False)]
        if optuna.trial.TrialState.COMPLETE in states:
            break
        assert proc.poll() is None, log_tail(log1)
        assert time.monotonic() < deadline, log_tail(log1)
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    t_end = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < t_end:
        time.sleep(0.2)
    killed = {t.number: t for t in _study(root).get_trials(deepcopy=False)}
    assert killed[0].state == optuna.trial.TrialState.FAIL and killed[0].params == BAD, killed[0]
    assert "label_smoothing" in killed[0].user_attrs["error"], killed[0].user_attrs  # the stage's own message
    done1 = {n for n, t in killed.items() if t.state == optuna.trial.TrialState.COMPLETE}
    running = {n for n, t in killed.items() if t.state == optuna.trial.TrialState.RUNNING}
    assert done1 and running, {n: t.state for n, t in killed.items()}
    assert _ledger(root) == []  # the search reads no test item

    # 2) run again: resumes the study, reruns only the interrupted trials' params, then promotes the best
    r = subprocess.run([keel, "sweep"], check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    report = json.loads((root / "reports/sweep.json").read_text())
    assert report["resumed_done"] == 1 + len(done1) and report["interrupted_requeued"] == len(running), report
    assert not set(report["ran_now"]) & (done1 | {0}), report["ran_now"]   # finished trials were not rerun
    trials = {t.number: t for t in _study(root).get_trials(deepcopy=False)}
    states = {n: t.state.name for n, t in trials.items()}
    for n in running:
        assert trials[n].user_attrs.get("interrupted") and states[n] == "FAIL", states
        retry = [t for t in trials.values() if t.user_attrs.get("retry_of") == n]
        assert len(retry) == 1 and retry[0].params == trials[n].params, states
    counted = [n for n, s in states.items() if s in ("COMPLETE", "PRUNED", "FAIL")
               and not trials[n].user_attrs.get("interrupted")]
    assert len(counted) == 4 and "RUNNING" not in states.values() and "WAITING" not in states.values(), states
    assert [n for n, s in states.items() if s == "FAIL" and not trials[n].user_attrs.get("interrupted")] == [0]

    # two at once: some two trials' [start, end] overlap (run 2 starts its two at the same moment)
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials.values() if t.number != 0
                   and t.datetime_complete)
    assert any(a[1] > b[0] for a, b in itertools.pairwise(spans)), spans

    # the winner: exactly one test read, one registered version that names the sweep, trial and candidates
    complete = [t for t in trials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    compared = sum(1 for s in states.values() if s in ("COMPLETE", "PRUNED"))
    assert report["best"]["number"] == best.number and report["compared_on_validation"] == compared, report
    promoted = report["promoted"]
    assert promoted["experiment"] == best.user_attrs["experiment"] and promoted["candidates_compared"] == compared
    ledger = _ledger(root)
    assert len(ledger) == 1, ledger
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns/mlflow.db'}")
    [version] = client.search_model_versions("name='keel-classifier'")
    assert version.tags["keel.sweep"] == "keel-sweep" and version.tags["keel.trial"] == str(best.number)
    assert version.tags["keel.candidates_compared"] == str(compared)
    assert version.tags["keel.selection"].startswith(f"sweep keel-sweep: trial {best.number} of {compared}")

    # MLflow: the sweep's run, every trial's training nested under it with its params and val curve
    [parent] = client.search_runs([client.get_experiment_by_name("keel").experiment_id],
                                  "tags.`keel.stage` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["keel.sweep.best_trial"] == str(best.number)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_trial = {int(c.data.tags["keel.trial"]): c for c in children if c.info.status != "KILLED"}
    # an interrupted trial's run (if its training had started) ended KILLED when the sweep resumed, none RUNNING
    assert all(c.info.status in ("FINISHED", "KILLED", "FAILED") for c in children), [
        (c.data.tags["keel.trial"], c.info.status) for c in children]
    assert all(int(c.data.tags["keel.trial"]) in running for c in children if c.info.status == "KILLED")
    for t in complete:
        # a retry whose training DVC's run-cache restored (the interrupted trial had finished training) trains
        # nothing new: its run is the interrupted trial's
        run = by_trial.get(t.number) or by_trial.get(t.user_attrs.get("retry_of"))
        assert run is not None, (t.number, t.user_attrs, sorted(by_trial), report["trials"])
        assert float(run.data.params["config.lr"]) == pytest.approx(t.params["train.lr"]), run.data.params
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2  # one point per epoch
    # one point per trial with a value, in the order trials finished (two at once: not always by number)
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "trial_value")) == sorted(
        n for n, st in states.items() if st in ("COMPLETE", "PRUNED"))

    # Prefect: two keel-sweep flow runs (the killed one never ended), one task run per trial of run 2
    q = subprocess.run([sys.executable, "-c", _PREFECT_QUERY], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    seen = json.loads(q.stdout.strip().splitlines()[-1])
    assert sorted(s for s in seen["flow_runs"]) == ["COMPLETED", "RUNNING"], seen
    names = {n for n, _ in seen["task_runs"]}
    assert {f"trial-{n}" for n in report["ran_now"]} <= names and "trial-0" in names, seen
    assert all(state in ("Completed", "Pruned", "Failed", "Running", "Crashed") for _, state in seen["task_runs"])
    task_state = {n: st for n, st in seen["task_runs"]}
    assert task_state["trial-0"] == "Failed", seen
    for n in report["ran_now"]:  # a pruned trial is a Completed task run named Pruned
        assert task_state[f"trial-{n}"] == {"COMPLETE": "Completed", "PRUNED": "Pruned", "FAIL": "Failed"}[states[n]]
    assert (root / "reports/sweep.png").stat().st_size > 10_000
    assert datetime.fromisoformat(report["trials"][0]["started"])


_PREFECT_QUERY = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["keel-sweep"])))
    tasks = c.read_task_runs()
print(json.dumps({"flow_runs": [r.state_type.value for r in runs],
                  "task_runs": [[t.name, t.state.name] for t in tasks]}))
"""
