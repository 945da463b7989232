"""The experiment loop of issue 16 on digits, as a user runs it: experiments stop at training and are compared on
validation (`dvc exp show`), one that would evaluate inside an experiment is refused before the test split is
opened, and `keel promote` of the chosen one reads the test split exactly once and registers one version whose tags
name the experiment and the number of candidates. Real dvc, real MLflow (the project's SQLite store)."""
from __future__ import annotations

import json
import sqlite3

import pytest
import yaml

from tests.e2e.test_pipeline import clone_repo, sh

pytestmark = pytest.mark.slow

FAST = {"ingest": {"workers": 1}, "shard": {"workers": 1},
        "train": {"epochs": 3, "warmup_steps": 10},
        # a short recipe: the gate is lowered so that the one registration this test expects can happen
        "register": {"min_val_accuracy": 0.3, "min_test_accuracy": 0.3, "min_test_macro_f1": 0.3}}
LRS = (0.001, 0.002, 0.006)
ENV = {"OMP_NUM_THREADS": "1"}


def _ledger(root) -> list[dict]:
    f = root / "data/test_ledger/ledger.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def _runs(root) -> int:
    db = root / "mlruns/mlflow.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("select count(*) from runs").fetchone()[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = clone_repo(tmp_path_factory.mktemp("exp") / "keel")
    (root / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in FAST.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = sh(["dvc", "repro", "train"], root, env=ENV)  # the baseline, up to training: no test read
    assert "Running stage 'evaluate'" not in r.stdout
    sh("git add -A && git commit -qm baseline", root)
    return root


def test_experiments_compare_on_val_and_promote_reads_test_once(project):
    root = project
    # an experiment that would run the whole pipeline is refused at evaluate, before the test split is opened; its
    # training (in DVC's temporary copy) logged to the project's tracking store, not the copy's
    runs = _runs(root)
    r = sh(["dvc", "exp", "run", "--temp", "-S", "train.lr=0.003"], root, check=False, env=ENV)
    assert r.returncode != 0
    assert "evaluate does not run inside a DVC experiment" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr
    assert "keel promote" in r.stdout + r.stderr
    assert _ledger(root) == [] and _runs(root) == runs + 1

    for i, lr in enumerate(LRS):
        sh(["dvc", "exp", "run", "train", "-S", f"train.lr={lr}", "-n", f"lr-{i}"], root, env=ENV)
    assert _ledger(root) == []  # three candidates, not one look

    show = json.loads(sh(["dvc", "exp", "show", "--json"], root).stdout)
    head = sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    [base] = [b for b in show if b["rev"] == head]
    exps = {}
    for rng in base["experiments"]:
        [e] = rng["revs"]
        exps[rng["name"]] = (e["data"]["params"]["params.yaml"]["data"]["train"]["lr"],
                             e["data"]["metrics"]["metrics/train.json"]["data"])
    assert {n: lr for n, (lr, _) in exps.items()} == {f"lr-{i}": lr for i, lr in enumerate(LRS)}
    assert all(0 < m["best_val_accuracy"] <= 1 and m["best_epoch"] >= 0 for _, m in exps.values())
    assert "metrics/test.json" not in base["data"]["metrics"]  # nothing in the table comes from the test split

    best = max(exps, key=lambda n: exps[n][1]["best_val_accuracy"])
    r = sh(["keel", "promote", best], root, check=False, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [e["action"] for e in _ledger(root)] == ["read"]  # exactly one test read
    assert "of 3 candidates compared on validation" in r.stderr
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["lr"] == exps[best][0]  # the applied experiment is what was evaluated

    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlruns/mlflow.db'}"
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='keel-classifier'")
    [v] = versions
    assert v.tags["keel.experiment"].startswith(best) and v.tags["keel.candidates_compared"] == "3"
    assert "best_val_accuracy" in v.tags["keel.selection"]
    promo = json.loads((root / "reports/promote.json").read_text())
    assert promo["experiment"] == best and promo["candidates_compared"] == 3


def test_promote_names_the_candidates_when_the_experiment_is_unknown(project):
    r = sh(["keel", "promote", "no-such-exp"], project, check=False, env=ENV)
    assert r.returncode == 1
    assert "keel promote: error: experiment 'no-such-exp' is not among the" in r.stderr, r.stderr
