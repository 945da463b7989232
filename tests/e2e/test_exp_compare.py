"""Comparing candidates on validation with DVC's own tools (issue 16): train metrics and plots are DVC-cached outputs,
so `dvc metrics diff` compares two commits, `dvc exp show` and `dvc plots diff` compare experiments; a queued
experiment (run by a `dvc queue` worker in a temporary copy) leaves the project's test ledger alone and logs its run
to the project's MLflow store; `dvc repro -f train` trains anew rather than resuming the finished training.

One cloned digits project for the module, a short recipe (2 epochs); the tests run in file order on it: two
experiments of the baseline commit (one in the workspace, one queued), then a second commit, then a forced retrain.
Real dvc, real MLflow (the project's SQLite store)."""
from __future__ import annotations

import csv
import json
import sqlite3
import time

import pytest
import yaml

from tests.e2e.test_pipeline import sh, trained_baseline

pytestmark = pytest.mark.slow

FAST = {"ingest": {"workers": 1}, "shard": {"workers": 1},
        "train": {"epochs": 2, "warmup_steps": 10},
        "register": {"min_val_accuracy": 0.3, "min_test_accuracy": 0.3, "min_test_macro_f1": 0.3}}
ENV = {"OMP_NUM_THREADS": "1"}
LR_WS, LR_QUEUED = 0.002, 0.006   # the baseline is params.yaml's 0.004
VAL = ("best_val_accuracy", "best_val_loss", "best_epoch")


def _ledger(root) -> list[dict]:
    f = root / "data/test_ledger/ledger.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _runs(root) -> list[tuple[str, str]]:
    """(run id, status) of every MLflow run in the project's store, oldest first."""
    db = root / "mlruns/mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        return c.execute("select run_uuid, status from runs order by start_time").fetchall()


def _metric_steps(root, run_id: str) -> dict[str, list[int]]:
    with sqlite3.connect(root / "mlruns/mlflow.db") as c:
        rows = c.execute("select key, step from metrics where run_uuid = ? order by step", (run_id,)).fetchall()
    out: dict[str, list[int]] = {}
    for key, step in rows:
        out.setdefault(key, []).append(step)
    return out


def _set_params(root, section: str, **values) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _exp_show(root) -> tuple[dict, dict]:
    """HEAD's own row and its experiments {name: (state, lr, train metrics)} from `dvc exp show --json`."""
    show = json.loads(sh(["dvc", "exp", "show", "--json"], root).stdout)
    head = sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    [base] = [b for b in show if b["rev"] == head]
    exps = {}
    for rng in base.get("experiments") or []:
        [e] = rng["revs"]
        data = e.get("data") or {}
        state = (rng.get("executor") or {}).get("state") or "success"
        lr = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {}).get("train", {}).get("lr")
        metrics = ((data.get("metrics") or {}).get("metrics/train.json") or {}).get("data")
        exps[rng["name"]] = (state, lr, metrics)
    return base, exps


def wait_for_queue(root, timeout_s: float = 600) -> str:
    """Until `dvc queue status` lists nothing queued or running (as a user watches it after `dvc queue start`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = sh(["dvc", "queue", "status"], root).stdout
        if not any(w in status for w in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"the queue did not drain in {timeout_s} s:\n{status}"
        time.sleep(3)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = trained_baseline(tmp_path_factory.mktemp("cmp") / "keel", FAST, ENV)
    return root


@pytest.fixture(scope="module")
def experiments(project):
    """Two experiments of the baseline commit: `ws` in the workspace, `queued` through `dvc queue`; the project's
    ledger and MLflow runs around each."""
    root = project
    runs0 = _runs(root)
    sh(["dvc", "exp", "run", "train", "-S", f"train.lr={LR_WS}", "-n", "ws"], root, env=ENV)
    runs1 = _runs(root)
    sh(["dvc", "exp", "run", "--queue", "train", "-S", f"train.lr={LR_QUEUED}", "-n", "queued"], root, env=ENV)
    sh(["dvc", "queue", "start", "-j", "1"], root, env=ENV)
    status = wait_for_queue(root)
    return {"runs": (runs0, runs1, _runs(root)), "ledger": _ledger(root), "queue_status": status}


def test_exp_show_and_plots_diff_compare_two_experiments_on_val(project, experiments):
    root = project
    base, exps = _exp_show(root)
    assert set(exps) == {"ws", "queued"}, exps
    assert {n: (s, lr) for n, (s, lr, _) in exps.items()} == {"ws": ("success", LR_WS),
                                                               "queued": ("success", LR_QUEUED)}
    for name, (_, _, m) in exps.items():
        assert m and all(k in m for k in VAL), (name, m)
        assert 0 < m["best_val_accuracy"] <= 1 and m["best_val_loss"] > 0 and m["steps"] > 0
    assert exps["ws"][2] != exps["queued"][2]  # two learning rates, two trainings
    assert "metrics/test.json" not in (base["data"].get("metrics") or {})  # nothing here comes from the test split

    # `--json` is DVC 3.67's (hidden) machine-readable form of `dvc plots diff`
    r = sh(["dvc", "plots", "diff", "--json", "--targets", "reports/train/epochs.csv", "reports/train/steps.csv",
            "--", "ws", "queued"], root)
    plots = json.loads(r.stdout)
    assert not plots.get("errors"), plots.get("errors")
    for target, x in (("reports/train/epochs.csv", "epoch"), ("reports/train/steps.csv", "step")):
        [rendered] = plots["data"][target]
        assert sorted(rendered["revisions"]) == ["queued", "ws"]
        values = rendered["content"]["data"]["values"]
        for rev in ("ws", "queued"):
            rows = [v for v in values if v["rev"] == rev]
            assert rows and all(x in v for v in rows), (target, rev)
        if target.endswith("epochs.csv"):
            # the last epoch's val accuracy of each is what exp show reports as best (cosine, 2 epochs: the last)
            for rev in ("ws", "queued"):
                accs = [float(v["val_accuracy"]) for v in values if v["rev"] == rev]
                assert len(accs) == FAST["train"]["epochs"]
                assert max(accs) == pytest.approx(exps[rev][2]["best_val_accuracy"])


def test_a_queued_experiment_logs_to_the_project_and_reads_no_test(project, experiments):
    root = project
    runs0, runs1, runs2 = experiments["runs"]
    assert "queued" in experiments["queue_status"] and "Success" in experiments["queue_status"]
    # each experiment's training is exactly one run in the project's store (not in the queue worker's copy)
    assert len(runs1) == len(runs0) + 1 and len(runs2) == len(runs1) + 1, (runs0, runs1, runs2)
    assert runs2[-1][1] == "FINISHED"
    assert experiments["ledger"] == [] and _ledger(root) == []  # two candidates, no look at test
    queued_run = runs2[-1][0]
    steps = _metric_steps(root, queued_run)
    assert steps.get("val_accuracy") and steps.get("train_loss"), steps


def test_metrics_diff_between_two_commits_shows_val_metrics_of_both(project, experiments):
    root = project
    baseline = sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    _, exps = _exp_show(root)
    sh(["git", "checkout", "--", "params.yaml", "dvc.lock"], root)  # back to the baseline (the ws exp was applied)
    sh(["dvc", "checkout", "train"], root)
    _set_params(root, "train", lr=LR_WS)
    runs = _runs(root)
    r = sh(["dvc", "repro", "train"], root, env=ENV)
    # the ws experiment's training (same params, data and code): DVC's run-cache restores it, nothing retrains
    assert "Stage 'train' is cached - skipping run, checking out outputs" in r.stdout, r.stdout
    assert _runs(root) == runs
    sh("git add -A && git commit -qm 'train.lr 0.002'", root)

    diff = json.loads(sh(["dvc", "metrics", "diff", "--json", baseline, "HEAD"], root).stdout)
    train = diff["metrics/train.json"]
    for key in ("best_val_accuracy", "best_val_loss"):
        assert isinstance(train[key]["old"], float) and isinstance(train[key]["new"], float), train[key]
    assert train["best_val_accuracy"]["old"] != train["best_val_accuracy"]["new"]
    # the commit's training is the experiment's
    assert train["best_val_accuracy"]["new"] == pytest.approx(exps["ws"][2]["best_val_accuracy"])
    assert "metrics/test.json" not in diff


def test_repro_force_train_trains_anew(project, experiments):
    """A finished training leaves models/last.pt; `dvc repro -f train` does not resume from it (models/ is not
    persisted, in-flight checkpoints live in data/checkpoints): every step from the first to the last is logged
    again, in exactly one new MLflow run."""
    root = project
    assert (root / "models/last.pt").exists()
    runs = _runs(root)
    r = sh(["dvc", "repro", "-f", "train"], root, env=ENV)
    assert "Running stage 'train'" in r.stdout
    assert "resum" not in (r.stdout + r.stderr).lower(), r.stderr[-2000:]
    events = (root / "reports/train/events.jsonl").read_text()
    assert '"resumed"' not in events
    after = _runs(root)
    assert after[:len(runs)] == runs and len(after) == len(runs) + 1, (runs, after)
    run_id, status = after[-1]
    assert status == "FINISHED"

    train = json.loads((root / "metrics/train.json").read_text())
    total = train["steps"]
    every = yaml.safe_load((root / "params.yaml").read_text())["train"].get("log_every_steps", 10)
    with (root / "reports/train/steps.csv").open() as f:
        logged = [int(row["step"]) for row in csv.DictReader(f)]
    # one row per window of log_every_steps from the first, and the last step
    assert logged == sorted({*range(every, total + 1, every), total}), logged
    assert train["epochs_run"] == FAST["train"]["epochs"]
    mlflow_steps = _metric_steps(root, run_id)
    assert mlflow_steps["train_loss"] == logged, mlflow_steps["train_loss"]
    assert len(mlflow_steps["val_accuracy"]) == FAST["train"]["epochs"]
    assert not any((root / "data/checkpoints").glob("*.pt"))  # the in-flight copies are gone once published
