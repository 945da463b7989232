"""One training is one MLflow run, against a real ``mlflow server``: SIGTERM ends it KILLED, the resume from last.pt
continues that same run to FINISHED (steps not repeated), an error ends it FAILED, a run that is gone is replaced
by a tagged new one; the run carries MLflow's context tags and the shards as its dataset input."""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.core.config import load_params
from tasks.core.lineage import git
from tasks.train import entry, outputs, trainer
from tests.stage.test_tracking import quiet_mlflow  # noqa: F401 - autouse: no telemetry, no proxy, no stray URI
from tests.stage.test_train import REPO, _params_file
from tests.support.mlflow_server import QUIET_ENV, mlflow_server

pytestmark = pytest.mark.slow  # a real mlflow server, and a `keel train` process

TINY = {"model": "keel_cifar_net_s", "epochs": 2, "batch_size": 32, "warmup_steps": 5, "lr": 0.004,
        "log_every_steps": 1}


@pytest.fixture(scope="module")
def server():
    with mlflow_server() as srv:
        yield srv


@pytest.fixture
def tracked(server, monkeypatch):
    """An MlflowClient on the server; in-process trainings log there, from the repository as the cwd."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("KEEL_TRACKING", raising=False)
    monkeypatch.chdir(REPO)
    return MlflowClient(server.uri)


def _train(params_file: Path):
    return entry.main(load_params(params_file))


def _runs(client) -> dict:
    exp = client.get_experiment_by_name("keel")
    return {} if exp is None else {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}


def _run_id(root: Path, folder: str = "checkpoints") -> str:
    """The run last.pt names: the in-flight one (checkpoints/) or the finished training's (models/)."""
    info = torch.load(root / folder / "last.pt", map_location="cpu", weights_only=True)["run_info"]
    return info["tracking_run_id"]


def _steps(client, run_id: str, key: str = "train_loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_sigterm_kills_the_run_and_the_resume_finishes_that_same_run(digits_pipeline, server, tracked, tmp_path):
    p, *_ = digits_pipeline
    params = _params_file(p, tmp_path, TINY)
    before = set(_runs(tracked))
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "train", "--params", str(params)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "reports" / "events.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # a few logged steps into epoch 0, then SIGTERM
        if events.exists() and events.read_text().count('"kind": "metrics"') >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err

    run_id = _run_id(tmp_path)  # last.pt names its run (a plain string: the safe loader reads it)
    assert set(_runs(tracked)) - before == {run_id}
    killed = tracked.get_run(run_id)
    assert killed.info.status == "KILLED"
    first = _steps(tracked, run_id)
    stopped = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["state"]["step"]
    assert first == list(range(1, stopped + 1))  # every step logged before the signal reached the server

    result = _train(params)  # the resume: in-process, the same server
    assert result.resumed_from_step == stopped
    assert set(_runs(tracked)) - before == {run_id}  # no second run
    run = tracked.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _steps(tracked, run_id) == list(range(1, result.steps + 1))  # continued, nothing logged twice
    log = Path(tracked.download_artifacts(run_id, "events.jsonl", str(tmp_path))).read_text()
    names = [json.loads(line)["name"] for line in log.splitlines()]
    assert names[:2] == ["sigterm", "resumed"]  # one event log across both segments

    tags = run.data.tags
    sha = run.data.params["shard_index_sha256"]
    assert tags["mlflow.runName"] == f"keel_cifar_net_s-{sha[:8]}"
    assert tags["mlflow.source.name"].endswith("tasks/cli.py") and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser()
    head = git("rev-parse", "HEAD", root=REPO)
    if head is not None:
        assert tags["mlflow.source.git.commit"] == head

    [ds] = run.inputs.dataset_inputs  # logged at the start and again at the resume: one input
    assert ds.dataset.digest == sha[:36] and ds.dataset.name == "shards (train+val)"
    assert str(Path(p.shards_dir).resolve()) in ds.dataset.source
    in_tags = {t.key: t.value for t in ds.tags}
    assert in_tags["mlflow.data.context"] == "training" and in_tags["keel.shard_index_sha256"] == sha


def test_an_error_ends_the_run_failed(digits_pipeline, tracked, tmp_path, monkeypatch):
    p, *_ = digits_pipeline
    params = _params_file(p, tmp_path, {**TINY, "epochs": 1, "max_steps": 3})
    before = set(_runs(tracked))

    def broken(self, epoch):
        raise RuntimeError("injected validation failure")

    monkeypatch.setattr(trainer.Trainer, "_validate", broken)
    with pytest.raises(RuntimeError, match="injected"):
        _train(params)
    [run_id] = set(_runs(tracked)) - before
    run = tracked.get_run(run_id)
    assert run.info.status == "FAILED"
    assert _steps(tracked, run_id) == [1, 2, 3]  # the buffered step metrics were flushed before the end


def test_sigterm_after_the_fit_still_ends_the_run_killed(digits_pipeline, tracked, tmp_path, monkeypatch):
    """The SigTerm callback covers the fit only; a SIGTERM while the stage writes its outputs used to end the
    process with the run left RUNNING."""
    p, *_ = digits_pipeline
    params = _params_file(p, tmp_path, {**TINY, "epochs": 1, "max_steps": 3})
    before = set(_runs(tracked))
    write = outputs.write

    def terminated_while_writing(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs in the main thread, here
        write(*a, **kw)

    monkeypatch.setattr(outputs, "write", terminated_while_writing)

    def unhandled(signum, frame):  # what the default action would be, without killing pytest
        raise RuntimeError("SIGTERM reached no handler of keel's")

    old = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(SystemExit) as exc:
            _train(params)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert exc.value.code == 128 + signal.SIGTERM
    [run_id] = set(_runs(tracked)) - before
    assert tracked.get_run(run_id).info.status == "KILLED"


def test_a_resume_whose_run_is_gone_logs_to_a_new_run_that_says_so(digits_pipeline, tracked, tmp_path, capfd):
    p, *_ = digits_pipeline
    params = _params_file(p, tmp_path, {**TINY, "epochs": 1, "max_steps": 3})
    _train(params)
    old = _run_id(tmp_path, "models")
    # a kill after the last checkpoint but before models/ was published leaves exactly this: the rerun resumes it
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "models" / "last.pt", tmp_path / "checkpoints" / "last.pt")
    tracked.delete_run(old)
    before = set(_runs(tracked))
    _train(params)  # resumes last.pt (at its last step) but cannot continue a deleted run
    [new] = set(_runs(tracked)) - before
    run = tracked.get_run(new)
    assert run.info.status == "FINISHED" and run.data.tags["keel.replaces_run_id"] == old
    assert f"tracking: run {old} (recorded in last.pt) is deleted" in capfd.readouterr().err
