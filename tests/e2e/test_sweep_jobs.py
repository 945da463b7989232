"""keel sweep with its trials as jobs (flows/sweep_trial.py), on digits, against a real Prefect server.

The cluster runs each trial as a Kubernetes Job through the keel-gpu work pool; here the same path runs through a
process work pool: a real ``prefect server``, ``prefect deploy --name keel-local-sweep-trial`` from prefect.yaml
and a real ``prefect worker`` that starts one process per trial flow run, as the Kubernetes worker starts one Job
per flow run. The checkout keeps its .git here, so only the trial's own copy is a no-SCM DVC project; the
cluster's (no .git at all) is covered by the code-rev check below and by tests/e2e/infra.

One test, in the order a user lives it: a trial whose params keel refuses fails in its own flow run and the sweep
goes on; two trials run at once, each its own flow run (linked under the sweep's task run) in its own process,
training in a copy of the project that is removed afterwards; the sweep promotes the best: its overrides are
applied in the project, `dvc repro` restores its training from the run-cache (no retraining), and the test split is
read exactly once; the registered version names the sweep, the trial and the number compared. Bad targets (not
FLOW/DEPLOYMENT, no server, a deployment that does not exist) are refused before any trial.
Every server and worker is started in its own process group and stopped by PID."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_flows import _api, _clean_env, _process, _run, prefect_server
from tests.e2e.test_pipeline import trained_baseline
from tests.e2e.test_sweep import _ledger, _study
from tests.support.mlflow_server import free_port
from tests.support.procs import log_tail

pytestmark = pytest.mark.slow

DEPLOYMENT = "keel-sweep-trial/keel-local-sweep-trial"
FAST = {"ingest": {"workers": 1}, "shard": {"workers": 1},
        "train": {"epochs": 2, "warmup_steps": 10},
        "register": {"min_val_accuracy": 0.3, "min_test_accuracy": 0.3, "min_test_macro_f1": 0.3},
        "sweep": {"n_trials": 3, "concurrency": 2, "budget_minutes": 30,
                  "space": {"train.lr": {"low": 0.001, "high": 0.01, "log": True},
                            "train.label_smoothing": {"low": 0.0, "high": 0.1}},
                  "pruning": {"enabled": False}}}
BAD = {"train.lr": 0.004, "train.label_smoothing": 1.5}   # keel refuses label_smoothing >= 1


def _keel_sweep(root: Path, env: dict[str, str], *args: str):
    return _run([str(Path(sys.executable).parent / "keel"), "sweep", *args], root, env, check=False, timeout=1200)


def test_sweep_trials_run_as_flow_runs_of_a_deployment_then_one_is_promoted(tmp_path):
    import optuna
    from mlflow import MlflowClient

    root = trained_baseline(tmp_path / "keel", FAST, {"OMP_NUM_THREADS": "1"})
    reads_before = len(_ledger(root))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
                     PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5")
    prefect = str(Path(sys.executable).parent / "prefect")

    # refused before Prefect starts: no FLOW/DEPLOYMENT form; no server configured
    r = _keel_sweep(root, env, "--trials-on", "keel-local-sweep-trial")
    assert r.returncode == 1 and "expected FLOW/DEPLOYMENT, e.g. keel-sweep-trial/keel-gpu-sweep-trial" in r.stderr
    no_api = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    r = _keel_sweep(root, no_api, "--trials-on", DEPLOYMENT)
    assert r.returncode == 1 and "trials as jobs need a Prefect server" in r.stderr, r.stderr[-2000:]

    with prefect_server(tmp_path, env, port):
        # a deployment that does not exist yet: refused before any trial, the study untouched
        r = _keel_sweep(root, env, "--trials-on", DEPLOYMENT)
        assert r.returncode == 1 and f"--trials-on {DEPLOYMENT}: no such deployment on {api}" in r.stderr, \
            r.stderr[-3000:]
        assert "prefect deploy --name keel-local-sweep-trial" in r.stderr
        _run([prefect, "work-pool", "create", "keel-local", "--type", "process"], root, env)
        _run([prefect, "--no-prompt", "deploy", "--name", "keel-local-sweep-trial"], root, env)
        [dep] = _api(api, "/deployments/filter", {})
        assert dep["entrypoint"] == "flows/sweep_trial.py:sweep_trial" and dep["work_pool_name"] == "keel-local"

        (root / "data/sweeps").mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name="keel-sweep", storage=f"sqlite:///{root / 'data/sweeps/optuna.db'}",
                                    direction="maximize")
        study.enqueue_trial(BAD)
        with _process([prefect, "worker", "start", "--pool", "keel-local"], tmp_path, env,
                      tmp_path / "worker.log"):
            # 1) the sweep, killed (SIGKILL, its process group) while two trial jobs train: they outlive it
            with open(tmp_path / "sweep1.log", "wb") as fh:
                first = subprocess.Popen([str(Path(sys.executable).parent / "keel"), "sweep", "--trials-on",
                                          DEPLOYMENT], cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            deadline = time.monotonic() + 600
            while True:
                running = [fr["name"] for fr in _api(api, "/flow_runs/filter", {})
                           if fr["deployment_id"] == dep["id"] and fr["state_type"] == "RUNNING"
                           and not fr["name"].endswith("-t0")]   # t0, refused, fails on its own
                if len(running) == 2:
                    break
                assert first.poll() is None, log_tail(tmp_path / "sweep1.log", 80)
                assert time.monotonic() < deadline, log_tail(tmp_path / "sweep1.log", 80)
                time.sleep(1)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            # 2) run again: it resumes the study, cancels the orphaned jobs, runs their params again, promotes
            r = _keel_sweep(root, env, "--trials-on", DEPLOYMENT)
            assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}\n{log_tail(tmp_path / 'worker.log', 60)}"
            deadline = time.monotonic() + 120
            while True:  # the worker stops a cancelled run's process on its next poll
                runs = _api(api, "/flow_runs/filter", {})
                orphans = [fr for fr in runs if fr["name"] in running]
                if all(fr["state_type"] == "CANCELLED" for fr in orphans) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            tasks = {t["id"]: t for t in _api(api, "/task_runs/filter", {})}
    out = r.stdout + r.stderr
    assert [fr["state_type"] for fr in orphans] == ["CANCELLED", "CANCELLED"], orphans
    report = json.loads((root / "reports/sweep.json").read_text())
    assert report["trials_on"] == DEPLOYMENT
    rows = {t["number"]: t for t in report["trials"]}
    # t0 refused; t1 and t2 interrupted by the kill (their jobs cancelled), rerun as t3 and t4
    assert [rows[n]["state"] for n in sorted(rows)] == ["FAIL", "FAIL", "FAIL", "COMPLETE", "COMPLETE"], rows
    assert "label_smoothing" in rows[0]["error"] and "less than 1" in rows[0]["error"], rows[0]["error"]
    assert [rows[n]["interrupted"] for n in sorted(rows)] == [False, True, True, False, False]
    assert sorted(running) == [rows[1]["experiment"], rows[2]["experiment"]]
    assert sorted(map(str, (rows[3]["params"], rows[4]["params"]))) == \
        sorted(map(str, (rows[1]["params"], rows[2]["params"])))
    assert all(t["trials_on"] == DEPLOYMENT and t["sets"] for t in rows.values())
    assert "outlived its sweep: cancelling it" in out

    # one flow run of the deployment per trial, named after it, in its own process, linked under its trial task run
    by_name = {fr["name"]: fr for fr in runs}
    sweep_runs = [fr for fr in runs if fr["name"] not in {t["experiment"] for t in rows.values()}]
    # the refused one (no such deployment), the killed one, the resumed one
    assert len(sweep_runs) == 3 and [fr["state_type"] for fr in sweep_runs].count("COMPLETED") == 1, sweep_runs
    trial_runs = [by_name[rows[n]["experiment"]] for n in sorted(rows)]
    assert [fr["state_type"] for fr in trial_runs] == ["FAILED", "CANCELLED", "CANCELLED", "COMPLETED", "COMPLETED"]
    assert all(fr["deployment_id"] == dep["id"] and fr["parent_task_run_id"] for fr in trial_runs)
    # run_deployment's placeholder task run in the sweep's flow run, whose parent is the task run trial-<N>
    parents = [tasks[tasks[fr["parent_task_run_id"]]["task_inputs"]["__parents__"][0]["id"]] for fr in trial_runs]
    assert [t["name"] for t in parents] == [f"trial-{n}" for n in sorted(rows)]
    [resumed] = [fr["id"] for fr in sweep_runs if fr["state_type"] == "COMPLETED"]
    killed = parents[0]["flow_run_id"]
    assert [t["flow_run_id"] for t in parents] == [killed] * 3 + [resumed] * 2 and killed != resumed
    rows = {n: t for n, t in rows.items() if not t["interrupted"]}
    # the two that trained overlapped in time (two at once)
    spans = sorted((datetime.fromisoformat(t["started"]), datetime.fromisoformat(t["ended"]))
                   for t in rows.values() if t["state"] == "COMPLETE")
    assert spans[1][0] < spans[0][1], spans
    # their copies are gone; their results are on the project's side
    assert not any((root / ".dvc/tmp/keel-trials").glob("*"))
    for t in rows.values():
        if t["state"] == "COMPLETE":
            res = json.loads((root / "data/sweeps/trials" / f"{t['experiment']}.json").read_text())
            assert res["metrics"]["best_val_accuracy"] == t["value"] and res["overrides"] == t["sets"]

    # the best promoted: its overrides applied here, its training restored from the run-cache, one test read
    best = report["best"]
    assert best["number"] == max((t for t in rows.values() if t["state"] == "COMPLETE"),
                                 key=lambda t: t["value"])["number"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for k, v in best["params"].items():
        section, key = k.split(".")
        assert params[section][key] == pytest.approx(v), (k, params[section][key], v)
    assert "Stage 'train' is cached - skipping run" in out, out[-5000:]
    assert len(_ledger(root)) == reads_before + 1
    promoted = report["promoted"]
    assert promoted["register"]["status"] == "registered" and promoted["candidates_compared"] == 2
    client = MlflowClient(f"sqlite:///{root / 'mlruns/mlflow.db'}")
    mv = client.get_model_version("keel-classifier", str(promoted["register"]["version"]))
    assert mv.tags["keel.sweep"] == "keel-sweep" and mv.tags["keel.trial"] == str(best["number"])
    assert mv.tags["keel.candidates_compared"] == "2"
    assert mv.tags["keel.experiment"] == f"{best['experiment']} (sweep trial run as a job on {DEPLOYMENT})"
    # the trials' training runs are nested under the sweep's MLflow run
    parent = report["mlflow_run_id"]
    exp = client.get_experiment_by_name("keel")
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    trials = {int(run.data.tags["keel.trial"]) for run in nested}
    assert {3, 4} <= trials <= {1, 2, 3, 4}, trials   # the killed ones may have started theirs
    assert _study(root).user_attrs["commit"] == _run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
