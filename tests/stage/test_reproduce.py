"""keel reproduce on a real registered model: the small pipeline is run with `dvc repro` in a temp git copy of the
repo (embedded SQLite registry), then the champion is retrained from its lineage in a git worktree.

(a) the same commit, data version, config and seed give bitwise-identical weights: reproduced yes, tagged, logged;
(b) an unseeded augmentation RNG patched into the worktree is caught: reproduced no, with weight and val deltas;
(c) bad references and broken lineage fail with a message and exit 1, without a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks import cli
from tasks.core.config import Paths, ReproduceConfig
from tasks.discipline import reproduce
from tests.e2e.test_pipeline import clone_repo, sh

NAME = "keel-classifier"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    clone = clone_repo(tmp_path_factory.mktemp("reproduce") / "keel")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"].update(epochs=2)  # small: the point is the comparison, not the accuracy
    params["register"].update(min_val_accuracy=0.0, min_test_accuracy=0.0, min_test_macro_f1=0.0)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git commit -qam 'small run'", clone)
    uri = f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "KEEL_TRACKING": "mlflow"}
    # the data stages write dvc.lock; commit it (as a user does) so that training runs on a clean tree
    sh(["dvc", "repro", "shard"], clone, env=env)
    sh("git add dvc.lock && git commit -qam 'data version'", clone)
    sh(["dvc", "repro"], clone, env=env)
    from mlflow.tracking import MlflowClient

    return clone, uri, env, MlflowClient(uri)


def test_champion_retrains_bitwise_identical(registered):
    clone, _uri, env, client = registered
    before = sh("git status --porcelain", clone).stdout
    r = sh(["keel", "reproduce", f"models:/{NAME}@champion"], clone, env=env)
    assert "reproduced: yes" in r.stdout, r.stdout + r.stderr
    report = json.loads((clone / "reports" / "reproduce.json").read_text())
    assert report["reproduced"] == "yes" and report["weights"]["bitwise_identical"]
    assert report["weights"]["max_abs_weight_delta"] == 0.0
    assert report["val"]["delta"] == 0.0 and report["val"]["within_tolerance"]
    assert report["test"]["status"].startswith("recorded result") and report["test"]["metrics"]["test_accuracy"] > 0
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert mv.tags["keel.reproduced"] == "yes"
    assert json.loads(mv.tags["keel.reproduce_deltas"])["weights_identical"] is True
    logged = {Path(a.path).name for a in client.list_artifacts(report["training_run_id"], "reproduce")}
    assert logged == {"reproduce.json", "reproduce.md"}
    # the user's working tree and worktree list are as they were
    assert sh("git status --porcelain", clone).stdout == before
    assert len(sh("git worktree list", clone).stdout.splitlines()) == 1
    ledger = (clone / "data/test_ledger/ledger.jsonl").read_text().splitlines()
    assert [json.loads(e)["action"] for e in ledger] == ["read"]  # no new test read


def test_unseeded_augmentation_is_caught(registered):
    clone, uri, _env, client = registered

    def unseeded(wt: Path) -> None:
        data = wt / "tasks" / "train" / "data.py"
        src = data.read_text()
        old = "    g = _generator(seed, epoch, 1 + index)\n"
        assert old in src
        data.write_text(src.replace(old, "    g = torch.Generator()\n    g.seed()  # drift: not seeded\n"))

    report = reproduce.run(ReproduceConfig(val_tolerance=0.0), Paths(), f"models:/{NAME}/1", root=clone,
                           tracking_uri=uri, before_train=unseeded)
    assert report["reproduced"] == "no"
    w = report["weights"]
    assert not w["bitwise_identical"] and w["max_abs_weight_delta"] > 0 and w["tensors_differing"] > 0
    assert isinstance(report["val"]["delta"], float)
    assert report["test"]["status"].startswith("not scored")
    assert client.get_model_version(NAME, "1").tags["keel.reproduced"] == "no"
    assert "DIFFERENT" in (clone / "reports" / "reproduce.md").read_text()


def _version(client, tags: dict) -> str:
    v1 = client.get_model_version(NAME, "1")
    return client.create_model_version(NAME, v1.source, run_id=v1.run_id, tags=tags).version


@pytest.mark.parametrize("case", ["no_model", "no_version", "bad_ref", "no_tag", "dirty", "unknown_sha", "no_data"])
def test_bad_input_fails_readably(registered, case, monkeypatch, capsys):
    clone, uri, _env, client = registered
    monkeypatch.chdir(clone)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    good = {k: v for k, v in client.get_model_version(NAME, "1").tags.items() if k.startswith("keel.")}
    model, expect = {
        "no_model": ("models:/nope@champion", "no registered model 'nope' with alias @champion"),
        "no_version": (f"models:/{NAME}/99", f"no registered model '{NAME}' with version 99"),
        "bad_ref": ("champion", "MODEL must be models:/<name>/<version>"),
    }.get(case, (None, None))
    if case == "no_tag":
        model, expect = f"models:/{NAME}/{_version(client, {})}", "lacks the lineage tag(s) keel.git_sha"
    elif case == "dirty":
        model = f"models:/{NAME}/{_version(client, {**good, 'keel.git_dirty': 'True'})}"
        expect = "trained from a dirty working tree"
    elif case == "unknown_sha":
        model = f"models:/{NAME}/{_version(client, {**good, 'keel.git_sha': '0' * 40})}"
        expect = "is not in the repository"
    elif case == "no_data":
        model = f"models:/{NAME}/{_version(client, {**good, 'keel.shard_index_sha256': 'f' * 64})}"
        expect = "data version not in the DVC cache/remote"
    rc = cli.main(["reproduce", model])
    err = capsys.readouterr().err
    # (MLflow may draw a download progress bar on stderr first)
    assert rc == 1 and "\nkeel reproduce: error: " in "\n" + err.replace("\r", "\n") and expect in err, err
    assert "Traceback" not in err
    assert len(sh("git worktree list", clone).stdout.splitlines()) == 1  # nothing left behind
