"""The Prefect flow over the DVC stages (flows/pipeline.py) and its deployments (prefect.yaml).

Slow tests, each on a fresh copy of the repo and the built-in digits (training shortened to 5 epochs through
the flow's own ``--set`` overrides, well above the register gate; one torch thread, see ``_clean_env``):
- the flow run locally against Prefect's ephemeral API (``python -m flows.pipeline``): all seven stages and a
  ``dvc push`` to a real S3 server (SeaweedFS), a second run that skips every stage, a bad override refused
  before any stage with the key named, a failing stage's own message, and a re-run that resumes at that stage;
- ``dvc pull`` of that push into a second fresh clone: the same shards and model, byte for byte;
- a real ``prefect server`` + work pools + ``prefect deploy --all`` + a process worker + ``prefect deployment
  run``: a Completed flow run whose result is the registered model (checked in the clone's MLflow registry);
  then, on the same server, a flow run whose register gate fails (a threshold raised by ``--set``: only register
  re-runs): exit 3, state GateFailed (type FAILED) with the failed check in its message as the server has it,
  its result and artifacts published, the registry unchanged.
Every server and worker is started in its own process group and stopped by PID; nothing is left running.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from flows import dvc_run, multinode, overrides, project, stages
from flows import pipeline as fp
from flows.errors import FlowError, StageFailed
from tests.e2e.test_pipeline import REPO, STAGES, _env, clone_repo, sh
from tests.support.mlflow_server import free_port, group_alive
from tests.support.procs import http_ok, log_tail
from tests.support.s3server import s3_with_bucket

FAST = ["train.epochs=5", "train.warmup_steps=20"]  # ~0.95 val accuracy on digits, half the default time
BUCKET = "keel-flows"


# ---------------------------------------------------------------------------------------------------------------
# unit tests (no Prefect run, no DVC run)


def test_stage_list_is_dvc_yaml():
    assert project.stage_names(REPO) == list(STAGES)
    assert list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == project.stage_names(REPO)


def test_torchrun_command_for_several_nodes():
    cmd = multinode.torchrun_command(4, 2, "node0.example:29400", "keel-42", is_host=True)
    assert Path(cmd[0]).name == "torchrun"
    assert cmd[1:] == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                       "--rdzv_endpoint=node0.example:29400", "--rdzv_id=keel-42", "--rdzv_conf=is_host=1",
                       f"--max_restarts={multinode.MULTINODE_MAX_RESTARTS}", "-m", "tasks.cli", "train"]
    assert not any(a.startswith("--rdzv_conf") for a in multinode.torchrun_command(1, 3, "h:1", "x"))
    assert "--standalone" not in multinode.torchrun_command(1, 3, "h:1", "x")
    with pytest.raises(FlowError, match="nnodes >= 2"):
        multinode.torchrun_command(1, 1, "h:1", "x")
    with pytest.raises(FlowError, match="host:port"):
        multinode.torchrun_command(1, 2, "nohostport", "x")
    with pytest.raises(FlowError, match="host:port"):
        multinode.torchrun_command(1, 2, "host:notaport", "x")
    # this node's address, as the others reach it (the pod IP on the cluster: KEEL_LOCAL_ADDR)
    cmd = multinode.torchrun_command(8, 2, "svc.ns:29400", "r", is_host=False, local_addr="10.1.2.3")
    assert cmd[cmd.index("--rdzv_conf=is_host=0") + 1] == "--local_addr=10.1.2.3"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nobody listens once the socket is closed


def test_join_train_wait_times_out_naming_the_endpoint(capsys):
    endpoint = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    rc = fp.main(["--join-train", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "x", "--wait-s", "1.5",
                  "--project-dir", "/nonexistent"])
    assert rc == 1 and time.monotonic() - t0 >= 1.4  # it waited the whole --wait-s (no upper bound: shared machine)
    out = capsys.readouterr()
    assert f"join-train: waiting up to 1.5 s for the rendezvous at {endpoint}" in out.out
    err = out.err.strip()
    assert err.startswith(f"keel flow: --join-train: nothing accepted a connection at {endpoint} within 1.5 s "
                          "(last: ConnectionRefusedError"), err
    assert "has reached its train stage" in err and "keel-flow-rdzv" in err


def test_join_train_wait_reports_progress_then_returns_when_the_endpoint_opens(capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{server.getsockname()[1]}"
        opener = threading.Timer(1.0, server.listen)
        opener.start()
        waited = multinode.wait_for_endpoint(endpoint, 30, poll_s=0.1, report_s=0.3)
        opener.join()
    assert waited > 0.9  # returned once the port opened, not before (the 30 s limit would have raised)
    out = capsys.readouterr().out
    assert out.count(f"join-train: waiting for the rendezvous at {endpoint} (") >= 2, out
    assert f"join-train: rendezvous {endpoint} is up" in out
    with pytest.raises(FlowError, match=r"unknown-host\.invalid resolves from this node"):
        multinode.wait_for_endpoint("unknown-host.invalid:29400", 0.3, poll_s=0.1)


def test_multinode_train_task_skips_or_launches_then_commits(tmp_path, monkeypatch):
    """The train task for nnodes > 1: unchanged -> skipped; changed -> torchrun (c10d) then `dvc commit train`."""
    for f in ("dvc.yaml", "params.yaml"):
        (tmp_path / f).write_bytes((REPO / f).read_bytes())
    calls: list[list[str]] = []
    status = {"out": "{}"}

    def quiet(cmd, root, env):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, status["out"], "")

    def logged(cmd, root, env, log=None):
        calls.append(cmd)
        return 0, "", ""

    monkeypatch.setattr(stages, "run_quiet", quiet)
    monkeypatch.setattr(stages, "run_logged", logged)
    monkeypatch.setattr(stages, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.delenv(multinode.LOCAL_ADDR_ENV, raising=False)
    res = stages.run_train_multinode.fn(str(tmp_path), 2, "h0:29400", "rid")
    assert res["status"] == "skipped" and calls == [dvc_run.dvc("status", "train", "--json")]
    calls.clear()
    status["out"] = json.dumps({"train": [{"changed deps": {"data/shards": "modified"}}]})
    res = stages.run_train_multinode.fn(str(tmp_path), 2, "h0:29400", "rid", rdzv_is_host=False)
    assert res["status"] == "ran"
    assert calls[1] == multinode.torchrun_command(1, 2, "h0:29400", "rid", False)  # train.devices: 1 in params.yaml
    assert calls[2] == dvc_run.dvc("commit", "--force", "train")
    calls.clear()
    monkeypatch.setenv(multinode.LOCAL_ADDR_ENV, "10.0.0.7")   # the flow-run pod's IP (base job template)
    stages.run_train_multinode.fn(str(tmp_path), 2, "h0:29400", "rid", rdzv_is_host=True)
    assert calls[1] == multinode.torchrun_command(1, 2, "h0:29400", "rid", True, local_addr="10.0.0.7")


def test_overrides_are_validated_before_params_yaml_changes(tmp_path):
    for f in ("dvc.yaml", "params.yaml"):
        (tmp_path / f).write_bytes((REPO / f).read_bytes())
    before = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(overrides.OverrideError, match=r"unknown parameter train\.lrr .*did you mean train\.lr\?"):
        overrides.apply_overrides(tmp_path, ["train.lrr=1"])
    with pytest.raises(overrides.OverrideError, match=r"train\.max_steps is not in params\.yaml.*\+train\.max_steps=5"):
        overrides.apply_overrides(tmp_path, ["train.max_steps=5"])
    with pytest.raises(overrides.OverrideError, match=r"train\.lr: Input should be greater than 0"):
        overrides.apply_overrides(tmp_path, ["train.epochs=3", "train.lr=-1"])
    with pytest.raises(overrides.OverrideError, match=r"train\.bogus: unknown key"):
        overrides.apply_overrides(tmp_path, ["+train.bogus=1"])
    with pytest.raises(overrides.OverrideError, match="KEY=VALUE"):
        overrides.apply_overrides(tmp_path, ["train.lr"])
    assert (tmp_path / "params.yaml").read_bytes() == before  # nothing written by a refused override
    assert overrides.apply_overrides(tmp_path, ["params.yaml:train.lr=0.002"], write=False) == {"train.lr": 0.002}
    assert (tmp_path / "params.yaml").read_bytes() == before
    got = overrides.apply_overrides(tmp_path, ["train.lr=0.002", "shard.resolution=16", "+train.max_steps=7"])
    assert got == {"train.lr": 0.002, "shard.resolution": 16, "train.max_steps": 7}
    text = (tmp_path / "params.yaml").read_text()
    assert "lr: 0.002" in text and "# at reference_batch 256" in text  # comments kept, as dvc exp run -S does
    p = yaml.safe_load(text)
    assert p["train"]["max_steps"] == 7 and p["shard"]["resolution"] == 16 and p["train"]["epochs"] == 8


def test_error_detail_is_the_stages_own_message():
    stderr = ("W1128 torch/distributed/run.py: some launcher noise\n"
              "keel train: error: unknown timm model 'resnet99'\n"
              "  known models like it: resnet50, resnet101\n"
              "Traceback (most recent call last):\n  File \"x\", line 1\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
              "ERROR: failed to reproduce 'train': failed to run: torchrun ..., exited with 1\n")
    assert dvc_run.error_detail(stderr) == ("keel train: error: unknown timm model 'resnet99'\n"
                                       "  known models like it: resnet50, resnet101")
    assert dvc_run.error_detail("a\n\nb\nERROR: failed to reproduce 'x'\n").splitlines()[-1].startswith("ERROR:")
    e = StageFailed("evaluate", 1, "keel evaluate: error: boom", transient=False)
    assert str(e) == "stage 'evaluate' failed (exit 1): keel evaluate: error: boom"
    import pickle

    assert pickle.loads(pickle.dumps(e)).detail == e.detail


def test_a_command_that_reads_and_writes_nothing_is_stopped_by_pid_and_a_busy_one_is_not(tmp_path):
    """The push watchdog (dvc_run.run_logged(stall_s=...)): a child that sits silent (a hung transfer; here a
    sleep, with a grandchild, so the whole group must go) is SIGKILLed after the stall and said so; one that
    keeps writing (a slow, live transfer) for longer than the stall runs to its end."""
    marker = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    hung = [sys.executable, "-c", code]
    t0 = time.monotonic()
    rc, _, err = dvc_run.run_logged(hung, tmp_path, dict(os.environ), stall_s=2.0)
    took = time.monotonic() - t0
    assert rc == -9 and dvc_run.stalled(err), err
    assert "read and wrote nothing for 2 s (a hung transfer): stopped (PID" in err, err
    assert took < 60, took  # not a speed claim: without the watchdog this returns after 300 s
    gpid = int(marker.read_text())
    for _ in range(50):
        if not psutil.pid_exists(gpid) or psutil.Process(gpid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {gpid} outlived the watchdog: the group was not killed")

    busy = [sys.executable, "-c", "import sys, time\nfor i in range(25):\n    print(i, flush=True); time.sleep(0.2)"]
    rc, out, err = dvc_run.run_logged(busy, tmp_path, dict(os.environ), stall_s=2.0)
    assert rc == 0 and out.split() == [str(i) for i in range(25)] and not dvc_run.stalled(err), (rc, err)


def test_a_hung_push_is_a_transient_stage_failure_that_names_the_hang(tmp_path, monkeypatch):
    calls = []

    def fake_run_logged(cmd, root, env, log=None, stall_s=None):
        calls.append((cmd, stall_s))
        return -9, "", ("Pushing\nkeel: `dvc push --remote r` read and wrote nothing for 60 s (a hung transfer): "
                        "stopped (PID 7, SIGKILL)\n")

    monkeypatch.setattr(dvc_run, "run_logged", fake_run_logged)
    with pytest.raises(StageFailed) as e:
        dvc_run.push(tmp_path, {}, "r")
    assert e.value.transient and e.value.stage == "push" and "read and wrote nothing for 60 s" in str(e.value)
    assert calls == [(dvc_run.dvc("push", "--remote", "r"), dvc_run.PUSH_STALL_S)]


def test_retries_only_on_transient_io_failures():
    class S:
        def __init__(self, data):
            self.data = data

    transient = StageFailed("register", 1, "connection refused", transient=True)
    assert stages.retry_if_transient(None, None, S(transient))
    assert not stages.retry_if_transient(None, None, S(StageFailed("ingest", 1, "keel ingest: error: no such bucket")))
    assert not stages.retry_if_transient(None, None, S(KeyError("a bug in the flow is not retried")))
    assert stages.retry_if_transient(None, None, S(ConnectionResetError("connection reset by peer")))
    assert dvc_run.looks_transient("botocore.exceptions.EndpointConnectionError: Could not connect")
    assert dvc_run.looks_transient("botocore: An error occurred (503) when calling GetObject: Slow Down")
    assert dvc_run.looks_transient("HTTP 503 Service Unavailable") and dvc_run.looks_transient("status code: 429")
    assert not dvc_run.looks_transient("keel validate: error: validation failed; val loss 0.500 after 500 steps")
    # a failed `dvc repro`: the command's own exit code (DVC's is 255), transient only from stderr's tail
    err = "x" * 5000 + "\nERROR: failed to reproduce 'ingest': failed to run: keel ingest, exited with 3\n"
    e = dvc_run.repro_failed("ingest", 255, "", "connection refused\n" + err)
    assert (e.returncode, e.transient) == (3, False)
    assert dvc_run.repro_failed("ingest", 255, "", err + "botocore: ReadTimeoutError: timed out\n").transient


def test_artifacts_each_on_its_own(tmp_path, monkeypatch, caplog):
    """A missing report costs its artifact only (a warning naming the file); the others are still published."""
    from flows import artifacts
    from tasks.core.config import Paths

    made: dict[str, object] = {}
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda md, key, description: made.update({key: md}))
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda rows, key, description: made.update({key: rows}))
    monkeypatch.setattr(artifacts, "get_run_logger", lambda: logging.getLogger("test"))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/test.json").write_text(json.dumps({"accuracy": 0.98765, "n": 360}))
    result = {"stages": [{"stage": "ingest", "status": "ran", "command_seconds": 1.0}], "overrides": {},
              "dvc_lock": {"sha256": "ab", "stages": {"ingest": {"data/raw": "cd"}}}, "push": {"pushed": False}}
    with caplog.at_level(logging.WARNING, logger="test"):
        artifacts.publish_artifacts(tmp_path, Paths(), result)
    warnings = [r.getMessage() for r in caplog.records]
    assert set(made) == {"keel-test-metrics", "keel-run"}
    assert made["keel-test-metrics"] == [{"metric": "accuracy", "value": "0.9877"}, {"metric": "n", "value": "360"}]
    assert "| ingest | ran | 1.0 | - |" in made["keel-run"] and "| ingest | data/raw | `cd` |" in made["keel-run"]
    assert len(warnings) == 5 and "artifact keel-model: not published (FileNotFoundError: reports/register.json)" in warnings


def test_gate_failures_name_each_failed_check():
    from flows.artifacts import gate_failures

    checks = [{"name": "val_accuracy", "value": 0.64, "threshold": 0.9, "passed": False, "detail": "best val"},
              {"name": "test_accuracy", "value": 0.95, "threshold": 0.9, "passed": True, "detail": "x"},
              {"name": "test_not_reused", "value": True, "threshold": False, "passed": False,
               "detail": "test set reused (2 looks) and register.allow_reused_test is false"},
              {"name": "champion", "value": 0.95, "threshold": 0.97, "passed": False, "detail": "vs @champion v1"}]
    assert gate_failures({"status": "gate_failed", "gate": {"passed": False, "checks": checks}}) == [
        "val_accuracy 0.6400 < register.min_val_accuracy 0.9",
        "test_not_reused: test set reused (2 looks) and register.allow_reused_test is false",
        "champion 0.9500 < 0.9700 (vs @champion v1)"]
    assert gate_failures(None) == gate_failures({"status": "registered"}) == []
    assert fp.gate_message(["a", "b"], "reports/register.json") == (
        "register gate failed: a; b (the registry is unchanged; report: reports/register.json)")


def test_push_remote_from_keel_dvc_remote_url(tmp_path, monkeypatch):
    sh("git init -q && dvc init -q", tmp_path)
    env = project.subprocess_env(tmp_path)
    monkeypatch.delenv("KEEL_DVC_REMOTE_URL", raising=False)
    assert dvc_run.resolve_remote(tmp_path, env, None) is None  # nothing configured: push is skipped
    assert dvc_run.resolve_remote(tmp_path, env, "mine") == "mine"
    monkeypatch.setenv("KEEL_DVC_REMOTE_URL", "s3://bucket/cache")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert dvc_run.resolve_remote(tmp_path, env, None) == dvc_run.ENV_REMOTE
    local = (tmp_path / ".dvc/config.local").read_text()
    assert "url = s3://bucket/cache" in local and "endpointurl = http://127.0.0.1:9" in local
    assert "keel-env" not in (tmp_path / ".dvc/config").read_text()  # never in the committed config


# ---------------------------------------------------------------------------------------------------------------
# helpers for the slow tests


def _clean_env(**extra: str) -> dict[str, str]:
    env = _env()
    for k in [k for k in env if k.startswith(("PREFECT_", "AWS_", "MLFLOW_TRACKING", "KEEL_DVC"))]:
        del env[k]
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", PREFECT_SERVER_UI_ENABLED="false",
               # one torch thread: on a shared 2-core machine two threads that lose a core run ~2-4x slower
               # (training here: 28 s with one thread under load, 21-50 s with two)
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _run(cmd, cwd, env, check=True, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def _flow(clone: Path, env: dict[str, str], *args: str, check: bool = True):
    """``python -m flows.pipeline --json ARGS`` in the clone; returns (CompletedProcess, result or None)."""
    r = _run([sys.executable, "-m", "flows.pipeline", "--json", *args], clone, env, check=check)
    out = r.stdout[r.stdout.find("{"):] if "{" in r.stdout else ""
    return r, (json.loads(out) if r.returncode == 0 else None)


def _status(result) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in result["stages"]}


def _hashes(root: Path, *rels: str) -> dict[str, str]:
    files = [p for rel in rels for p in sorted((root / rel).rglob("*") if (root / rel).is_dir() else [root / rel])]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


@contextlib.contextmanager
def _process(cmd, cwd, env, log: Path):
    """Start ``cmd`` in its own process group; on exit SIGTERM the group (and any descendant that left it),
    then SIGKILL what is left, and check that nothing survived."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    seen: set[int] = set()
    try:
        yield proc, seen
    finally:
        with contextlib.suppress(psutil.Error):
            seen |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for pid in seen:  # a child that started its own session (e.g. a flow run) is not in the group
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(proc.pid), f"processes left in group {proc.pid}:\n{log_tail(log)}"
        alive = [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"descendants of {cmd[:3]} left running: {alive}"


@contextlib.contextmanager
def prefect_server(tmp_path: Path, env: dict[str, str], port: int):
    """``prefect server start`` on 127.0.0.1:``port`` (its own process group, stopped by PID), once healthy."""
    prefect = str(Path(sys.executable).parent / "prefect")
    server_cmd = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _process(server_cmd, tmp_path, env, tmp_path / "server.log") as (server, _):
        deadline = time.monotonic() + 90
        while not http_ok(f"http://127.0.0.1:{port}/api/health"):
            assert server.poll() is None and time.monotonic() < deadline, log_tail(tmp_path / "server.log")
            time.sleep(0.3)
        yield


def _api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{url}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------------------------------
# the flow against the ephemeral API, with a real S3 DVC remote


@pytest.fixture(scope="module")
def s3():
    with s3_with_bucket(BUCKET) as server:
        yield server


def _s3_env(s3) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1"}


def _add_s3_remote(clone: Path, s3) -> None:
    sh(["dvc", "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvc"], clone)
    sh(["dvc", "remote", "modify", "s3remote", "endpointurl", s3.endpoint], clone)


@pytest.fixture(scope="module")
def flow_clone(tmp_path_factory, s3):
    """A fresh clone whose default DVC remote is the S3 server, after its first flow run (all stages + push)."""
    root = tmp_path_factory.mktemp("flow")
    clone = clone_repo(root / "keel")
    _add_s3_remote(clone, s3)
    env = _clean_env(PREFECT_HOME=str(root / "prefect-home"), **_s3_env(s3))
    r, result = _flow(clone, env, *[a for kv in FAST for a in ("--set", kv)])
    return clone, env, r, result


@pytest.mark.slow
def test_flow_runs_every_stage_then_skips_refuses_fails_and_resumes(flow_clone):
    clone, env, first, result = flow_clone
    # 1) a fresh clone: all seven stages ran, in dvc.yaml's order, with the overrides applied to params.yaml
    assert list(_status(result)) == list(STAGES) and set(_status(result).values()) == {"ran"}, result["stages"]
    assert result["overrides"] == {"train.epochs": 5, "train.warmup_steps": 20}
    params = yaml.safe_load((clone / "params.yaml").read_text())
    assert params["train"]["epochs"] == 5 and params["train"]["warmup_steps"] == 20
    lock_bytes = (clone / "dvc.lock").read_bytes()
    lock = yaml.safe_load(lock_bytes)
    assert result["dvc_lock"]["sha256"] == hashlib.sha256(lock_bytes).hexdigest()
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 5  # the data version records it
    shard_md5 = {o["path"]: o["md5"] for o in lock["stages"]["shard"]["outs"]}
    assert result["dvc_lock"]["stages"]["shard"] == shard_md5 and shard_md5["data/shards"].endswith(".dir")
    assert result["metrics"]["metrics/test.json"]["test_accuracy"] > 0.9
    assert result["metrics"]["metrics/train.json"]["epochs_run"] == 5
    reg = result["register"]
    assert reg["status"] == "registered" and str(reg["version"]) == "1" and "champion" in reg["aliases"], reg
    assert reg["model_uri"] == "models:/keel-classifier@champion" and reg["tracking_uri"].startswith("sqlite:")
    assert result["push"]["pushed"] and result["push"]["remote"] == "s3remote", result["push"]
    log = first.stderr + first.stdout  # the stages' output is in the flow's log
    assert "Running stage 'train'" in log and "> torchrun --standalone --nproc_per_node=1 -m tasks.cli train" in log

    # 2) a second run changes nothing: every stage skipped by DVC, dvc.lock untouched
    r, again = _flow(clone, env, "--no-push")
    assert set(_status(again).values()) == {"skipped"}, again["stages"]
    assert again["overrides"] == {} and again["dvc_lock"]["sha256"] == result["dvc_lock"]["sha256"]
    assert again["register"]["version"] == reg["version"]

    # 3) a typo in an override: refused before any stage (and before Prefect starts), with the key named
    params_before = (clone / "params.yaml").read_bytes()
    r, _ = _flow(clone, env, "--set", "train.lrr=1", check=False)
    assert r.returncode == 1 and "Running stage" not in r.stdout + r.stderr
    assert "unknown parameter train.lrr" in r.stderr and "did you mean train.lr?" in r.stderr, r.stderr
    assert (clone / "params.yaml").read_bytes() == params_before and (clone / "dvc.lock").read_bytes() == lock_bytes

    # 4) a failing stage fails the flow with the stage's own message; 5) the re-run resumes at that stage
    import torch

    if torch.cuda.is_available():
        pytest.skip("the failing-stage case uses evaluate.device=cuda on a machine without CUDA")
    r, _ = _flow(clone, env, "--no-push", "--set", "evaluate.device=cuda", check=False)
    assert r.returncode == 1
    last = next(line for line in r.stderr.splitlines() if line.startswith("keel flow:"))
    assert last.startswith("keel flow: stage 'evaluate' failed (exit 1): keel evaluate: error: evaluate.device=cuda "
                           "but no CUDA device is available"), r.stderr[-3000:]
    assert "CalledProcessError" not in r.stderr
    r, resumed = _flow(clone, env, "--no-push", "--set", "evaluate.device=auto")
    status = _status(resumed)
    assert [status[s] for s in STAGES[:5]] == ["skipped"] * 5 and status["evaluate"] == "ran", resumed["stages"]
    assert resumed["register"]["status"] in ("registered", "already_registered")
    assert str(resumed["register"]["version"]) == "1"  # the same weights: no second version


@pytest.mark.slow
def test_s3_remote_push_then_pull_into_a_fresh_clone(flow_clone, s3, tmp_path):
    clone, _, _, result = flow_clone
    assert result["push"]["pushed"]
    objects = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="dvc/").get("KeyCount", 0)
    assert objects > 5, objects
    # a teammate's fresh clone at the commit that recorded this run (dvc.lock and params.yaml), same remote
    other = clone_repo(tmp_path / "other")
    for f in ("dvc.lock", "params.yaml"):
        (other / f).write_bytes((clone / f).read_bytes())
    _add_s3_remote(other, s3)
    _run(["dvc", "pull"], other, _clean_env(**_s3_env(s3)))
    tracked = ("data/shards", "models", "data/split/manifest.parquet", "data/raw/items")
    want, got = _hashes(clone, *tracked), _hashes(other, *tracked)
    assert any(k.startswith("data/shards/train/") for k in want) and "models/best.pt" in want
    assert got == want
    # and DVC agrees the pulled data is exactly what dvc.lock records
    st = _run(["dvc", "data", "status", "--json", "--granular"], other, _clean_env())
    assert not json.loads(st.stdout or "{}").get("uncommitted"), st.stdout
    # wrong credentials are refused by the server (a real S3 API), so the pull above was authenticated
    bad = _run(["dvc", "fetch", "-f"], other, _clean_env(AWS_ACCESS_KEY_ID="nope", AWS_SECRET_ACCESS_KEY="nope" * 8),
               check=False)
    assert bad.returncode != 0


# ---------------------------------------------------------------------------------------------------------------
# deployments on a real Prefect server, run by a process worker


def _gate_failed_run_on_the_server(clone: Path, env: dict[str, str], api: str) -> None:
    """The CLI against the real server, with a gate threshold no model meets: only register re-runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    r, _ = _flow(clone, env, "--no-push", "--set", "register.min_val_accuracy=0.9999", check=False)
    assert r.returncode == fp.EXIT_GATE_FAILED, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.find("{"):])  # the result is printed (--json) on a failed gate too
    status = _status(result)
    assert [status[s] for s in STAGES[:-1]] == ["skipped"] * 6 and status["register"] == "ran", result["stages"]
    reasons = result["register"]["gate_failed"]
    assert result["register"]["status"] == "gate_failed" and len(reasons) == 1, result["register"]
    assert reasons[0].startswith("val_accuracy 0.") and reasons[0].endswith(" < register.min_val_accuracy 0.9999")
    message = f"register gate failed: {reasons[0]} (the registry is unchanged; report: reports/register.json)"
    assert f"keel flow: {message}" in r.stderr.splitlines(), r.stderr[-3000:]

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        [fr] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=[fp.GATE_FAILED_STATE]))))
        assert fr.state.is_failed() and fr.state.name == "GateFailed" and fr.state.message == message, fr.state
        assert fr.state_type.value == "FAILED" and fr.parameters["overrides"] == ["register.min_val_accuracy=0.9999"]
        stored = fr.state.result(raise_on_failure=False)  # the persisted JSON result, as for a Completed run
        assert stored["register"] == result["register"] and stored["dvc_lock"] == result["dvc_lock"]
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id]))) if a.key}
    assert {"keel-data-audit", "keel-training", "keel-test-metrics", "keel-model", "keel-run"} <= set(arts), arts
    assert "keel-model-link" in arts  # the report names the version this model already has (v1, from before)
    assert reasons[0] in arts["keel-model"].data and f"gate failed: {reasons[0]}" in arts["keel-run"].data


@pytest.mark.slow
def test_deployment_runs_on_a_real_server_through_a_process_worker(tmp_path):
    clone = clone_repo(tmp_path / "keel")
    home = tmp_path / "prefect-home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _clean_env(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1",
                     PREFECT_WORKER_PREFETCH_SECONDS="5")
    prefect = str(Path(sys.executable).parent / "prefect")
    with prefect_server(tmp_path, env, port):
        _run([prefect, "work-pool", "create", "keel-local", "--type", "process"], clone, env)
        # the cluster pool from the real base job template: the server validates the deployment's job variables
        _run([prefect, "work-pool", "create", "keel-gpu", "--type", "kubernetes", "--base-job-template",
              str(clone / "infra/prefect/k8s-base-job-template.json")], clone, env)
        _run([prefect, "--no-prompt", "deploy", "--all"], clone, env)
        deps = {d["name"]: d for d in _api(api, "/deployments/filter", {})}
        assert set(deps) == {"keel-local", "keel-gpu-nightly", "keel-gpu-multinode", "keel-local-sweep-trial",
                             "keel-gpu-sweep", "keel-gpu-sweep-trial"}
        local, gpu, multi = deps["keel-local"], deps["keel-gpu-nightly"], deps["keel-gpu-multinode"]
        assert local["work_pool_name"] == "keel-local" and local["entrypoint"] == "flows/pipeline.py:pipeline"
        assert local["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(clone)}}]
        assert gpu["work_pool_name"] == multi["work_pool_name"] == "keel-gpu"
        # the cluster runs: the workspace volume prepared from the image's /opt/keel, then the flow runs in it
        for d in (gpu, multi):
            assert [list(s) for s in d["pull_steps"]] == [["prefect.deployments.steps.run_shell_script"],
                                                          ["prefect.deployments.steps.set_working_directory"]]
            assert d["pull_steps"][0]["prefect.deployments.steps.run_shell_script"]["script"] == \
                "python -m flows.workspace --source /opt/keel --workspace /workspace"
            assert d["pull_steps"][1]["prefect.deployments.steps.set_working_directory"] == {"directory": "/workspace"}
        assert [s["schedule"]["cron"] for s in gpu["schedules"]] == ["0 2 * * *"] and not multi["schedules"]
        jv = gpu["job_variables"]
        assert jv["gpu_count"] == 8 and jv["image"] and jv["env"]["MLFLOW_TRACKING_URI"].startswith("http")
        assert not any("AWS" in k for k in jv["env"])  # credentials come from the Secret via the template
        assert gpu["parameters"]["nnodes"] == 1 and "rdzv_endpoint" in gpu["parameters"]
        assert gpu["parameters"]["overrides"] == multi["parameters"]["overrides"] == ["train.devices=8"]
        # the YAML merge key gave the multi-node deployment the same job variables, plus its rendezvous label
        assert multi["job_variables"] == {**jv, "pod_labels": {"keel.dev/role": "flow-run",
                                                               "keel.dev/rendezvous": "keel-multinode"}}
        assert multi["parameters"]["nnodes"] == 2 and multi["parameters"]["rdzv_is_host"] is True
        assert multi["parameters"]["rdzv_endpoint"] == "keel-flow-rdzv.keel.svc.cluster.local:29400"
        # a sweep on the cluster: its driver and one GPU Job per trial, both in the workspace volume
        sweep, trial = deps["keel-gpu-sweep"], deps["keel-gpu-sweep-trial"]
        assert sweep["entrypoint"] == "flows/sweep.py:sweep" and trial["entrypoint"] == "flows/sweep_trial.py:sweep_trial"
        assert sweep["parameters"]["trials_on"] == "keel-sweep-trial/keel-gpu-sweep-trial"
        assert deps["keel-local-sweep-trial"]["entrypoint"] == trial["entrypoint"]
        for d in (sweep, trial):
            assert d["work_pool_name"] == "keel-gpu" and d["pull_steps"] == gpu["pull_steps"]
            assert d["job_variables"]["gpu_count"] == 1 and d["job_variables"]["image"] == jv["image"]
        def limit(d):  # the server keeps a deployment's concurrency_limit as a global concurrency limit
            return d.get("concurrency_limit") or (d.get("global_concurrency_limit") or {}).get("limit")

        assert limit(trial) == 4 and limit(sweep) == 1

        with _process([prefect, "worker", "start", "--pool", "keel-local"], tmp_path, env,
                      tmp_path / "worker.log") as (worker, seen):
            params = json.dumps({"overrides": FAST, "push": False})
            r = _run([prefect, "deployment", "run", "keel-pipeline/keel-local", "--params", params], clone, env)
            run_id = next(line.split("UUID:")[1].strip() for line in r.stdout.splitlines() if "UUID:" in line)
            deadline = time.monotonic() + 900
            while True:
                with contextlib.suppress(psutil.Error):
                    seen |= {c.pid for c in psutil.Process(worker.pid).children(recursive=True)}
                fr = _api(api, f"/flow_runs/{run_id}")
                if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                assert worker.poll() is None, log_tail(tmp_path / "worker.log", 60)
                assert time.monotonic() < deadline, f"flow run still {fr['state_type']}"
                time.sleep(2)
            assert fr["state_type"] == "COMPLETED", f"{fr['state']}\n{log_tail(tmp_path / 'worker.log', 80)}"
            # the flow's result (persisted as JSON by the flow): a registered model
            result = json.loads(Path(fr["state"]["data"]["storage_key"]).read_text())
            assert set(_status(result).values()) == {"ran"} and result["overrides"]["train.epochs"] == 5
            reg = result["register"]
            assert reg["status"] == "registered" and "champion" in reg["aliases"], reg
            arts = {a["key"] for a in _api(api, "/artifacts/filter", {}) if a.get("key")}
            assert {"keel-data-audit", "keel-leakage", "keel-validation", "keel-training", "keel-test-metrics",
                    "keel-model", "keel-model-link", "keel-run"} <= arts, arts
        _gate_failed_run_on_the_server(clone, env, api)
    from mlflow.tracking import MlflowClient

    registry = MlflowClient(f"sqlite:///{clone / 'mlruns/mlflow.db'}")
    champion = registry.get_model_version_by_alias("keel-classifier", "champion")
    assert str(champion.version) == str(reg["version"])
    assert len(registry.search_model_versions("name='keel-classifier'")) == 1  # the failed gate registered nothing
    test = json.loads((clone / "metrics/test.json").read_text())
    assert champion.tags["keel.model_sha256"] == test["model_sha256"]
