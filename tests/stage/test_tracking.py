"""tasks.core.tracking against real MLflow stores: the embedded SQLite default and a real ``mlflow server``."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tasks.core.tracking import MAX_PARAM_VAL_LENGTH, MlflowLogger, flatten_params, tracking_uri
from tests.support.mlflow_server import group_alive, mlflow_server

PARAMS = {"model": {"arch": "resnet18", "pretrained": True}, "optim": {"lr": 0.01, "betas": [0.9, 0.99]},
          "epochs": 3, "note": "x" * 7000}


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A separate, empty cwd: MLflow's fallbacks (./mlruns) would show up here."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _round_trip(uri: str, tmp_path: Path, experiment: str = "keel-test") -> MlflowLogger:
    """Log one of everything through the MetricLogger protocol and close the run."""
    art = tmp_path / "confusion.json"
    art.write_text(json.dumps({"tp": 3}))
    lg = MlflowLogger(experiment, "run-a", uri, tags={"stage": "train", "seed": 7})
    lg.log_params(PARAMS)
    for step in range(3):
        lg.log_metrics({"train/loss": 1.0 / (step + 1), "val acc": 0.5 + step / 10}, step=step)
    lg.log_event("checkpoint", "saved epoch 1", step=1)
    lg.log_artifact(art)
    lg.set_tags({"git_sha": "abc123"})
    lg.close("FINISHED")
    return lg


def _check_round_trip(uri: str, run_id: str, steps=(0, 1, 2), events=1) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.arch"] == "resnet18" and p["model.pretrained"] == "True"
    assert p["optim.lr"] == "0.01" and p["optim.betas"] == "[0.9, 0.99]" and p["epochs"] == "3"
    assert len(p["note"]) == MAX_PARAM_VAL_LENGTH and p["note"].endswith("[truncated]")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(steps)
    assert [m.step for m in client.get_metric_history(run_id, "val acc")] == list(steps)
    assert run.data.tags["stage"] == "train" and run.data.tags["seed"] == "7"
    assert run.data.tags["git_sha"] == "abc123" and run.data.tags["mlflow.runName"] == "run-a"
    assert "checkpoint" in run.data.tags["last_event"]
    assert run.data.metrics["events_count"] == events
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"confusion.json", "events.jsonl", "params.json"} <= names
    lines = Path(client.download_artifacts(run_id, "events.jsonl")).read_text().splitlines()
    assert len(lines) == events and json.loads(lines[0])["name"] == "checkpoint"
    full = json.loads(Path(client.download_artifacts(run_id, "params.json")).read_text())
    assert len(full["note"]) == 7000 and full["optim.lr"] == 0.01


def test_flatten_params():
    flat = flatten_params({"a": {"b": {"c": 1}}, "bad key!": None, "/lead": 1, "empty": {}, "p": Path("x/y")})
    assert flat == {"a.b.c": "1", "bad key_": "None", "_lead": "1", "empty": "{}", "p": "x/y"}


def test_tracking_uri_default_and_env(tmp_path, monkeypatch):
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:1"


def test_embedded_sqlite_round_trip(tmp_path, workdir):
    repo_mlruns = Path(__file__).resolve().parents[2] / "mlruns"
    repo_had_mlruns = repo_mlruns.exists()
    project = tmp_path / "project"
    project.mkdir()
    uri = tracking_uri(project)
    assert uri.startswith("sqlite:///") and str(project) in uri

    lg = _round_trip(uri, tmp_path)
    _check_round_trip(uri, lg.run_id)

    # Artifacts and the database live under the project; nothing in the cwd (MLflow's ./mlruns fallback).
    assert (project / "mlruns" / "mlflow.db").is_file()
    assert lg.artifact_uri.startswith((project / "mlruns" / "artifacts").as_uri())
    assert (project / "mlruns" / "artifacts").rglob("confusion.json")
    assert list(workdir.iterdir()) == []
    assert repo_mlruns.exists() == repo_had_mlruns

    # Resume: a changed param is not an error (it becomes an event); FAILED status via the context manager.
    again = MlflowLogger("ignored", None, uri, resume_run_id=lg.run_id)
    with pytest.warns(UserWarning, match="epochs"):
        again.log_params({**PARAMS, "epochs": 5})
    with pytest.raises(RuntimeError, match="boom"), again:
        raise RuntimeError("boom")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(lg.run_id)
    assert run.info.status == "FAILED" and run.data.params["epochs"] == "3"
    assert "param_changed" in run.data.tags["last_event"]
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_server_round_trip_and_resume(tmp_path, workdir, monkeypatch):
    from mlflow.tracking import MlflowClient

    with mlflow_server() as srv:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
        uri = tracking_uri(tmp_path / "project")
        assert uri == srv.uri

        lg = _round_trip(uri, tmp_path)
        _check_round_trip(uri, lg.run_id)
        assert lg.artifact_uri.startswith("mlflow-artifacts:")
        assert list((srv.dir / "artifacts").rglob("confusion.json"))  # proxied into the server's store

        # Resumed training appends to the same run: more steps, events carried over, status back to FINISHED.
        res = MlflowLogger("keel-test", None, uri, tags={"resumed": "1"}, resume_run_id=lg.run_id)
        assert res.run_id == lg.run_id
        assert MlflowClient(uri).get_run(lg.run_id).info.status == "RUNNING"
        res.log_params(PARAMS)  # identical values: no error
        for step in (3, 4):
            res.log_metrics({"train/loss": 0.1, "val acc": 0.9}, step=step)
        res.log_event("checkpoint", "saved epoch 2", step=4)
        res.close()

        _check_round_trip(uri, lg.run_id, steps=range(5), events=2)
        client = MlflowClient(uri)
        run = client.get_run(lg.run_id)
        assert run.data.tags["resumed"] == "1"
        assert [m.step for m in client.get_metric_history(lg.run_id, "events_count")] == [1, 4]
        exp = client.get_experiment_by_name("keel-test")
        assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [lg.run_id]
        pid = srv.pid

    assert not group_alive(pid)
    left = subprocess.run(["pgrep", "-af", "mlflow server"], check=False, capture_output=True, text=True).stdout
    assert str(srv.port) not in left and str(srv.dir) not in left, left
    assert not srv.dir.exists()
    assert list(workdir.iterdir()) == []


def test_open_run_continues_a_run_or_replaces_a_missing_one(tmp_path, workdir, capsys):
    """What a resumed training gets: its own run back when the store has it, else a new run that names the one it
    replaces; a new run carries MLflow's context tags, and a dataset logged twice is one input."""
    from mlflow.tracking import MlflowClient

    from tasks.core.tracking import REPLACES_TAG, open_run

    uri = tracking_uri(tmp_path / "project")
    first = open_run("keel-test", "m-1234abcd", uri, tags={"keel.stage": "train"})
    for _ in range(2):  # at the start and again at a resume: one input
        first.log_dataset("shards", "ab" * 32, str(tmp_path / "shards"), tags={"keel.shard_index_sha256": "ab" * 32})
    first.close("KILLED")
    again = open_run("keel-test", "ignored", uri, resume_run_id=first.run_id)
    assert again.run_id == first.run_id and again.resumed
    again.close()
    client = MlflowClient(uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "m-1234abcd"
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= run.data.tags.keys()
    [ds] = run.inputs.dataset_inputs
    assert ds.dataset.digest == ("ab" * 32)[:36] and ds.dataset.name == "shards"
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"

    new = open_run("keel-test", "m-1234abcd", uri, resume_run_id="0" * 32)
    new.close()
    assert new.run_id != "0" * 32
    assert client.get_run(new.run_id).data.tags[REPLACES_TAG] == "0" * 32
    assert f"run {'0' * 32} (recorded in last.pt) does not exist" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []
