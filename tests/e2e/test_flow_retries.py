"""The flow's retry wiring, run by Prefect itself: ``io_options`` on a real task in a real flow (Prefect's
ephemeral API in a subprocess with its own PREFECT_HOME). A transient stage failure is retried until it passes;
a bug, a refused input and an exhausted budget are not hidden: they fail after the attempts the rule allows."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.test_flows import _clean_env
from tests.e2e.test_pipeline import REPO
from tests.support.mlflow_server import free_port

SCRIPT = r'''
import json, sys
from prefect import flow, task
from flows.errors import StageFailed
from flows.stages import io_options

attempts = {}

def failing(name, errors):
    @task(name=name, persist_result=False)
    def t():
        n = attempts[name] = attempts.get(name, 0) + 1
        if n <= len(errors):
            raise errors[n - 1]
        return "ok"
    return t.with_options(**io_options(3, backoff_s=0.01))

CASES = {
    "transient_then_ok": [StageFailed("ingest", 1, "S3 SlowDown", transient=True)] * 2,
    "refused_input": [StageFailed("ingest", 1, "keel ingest: error: bucket does not exist")],
    "bug_in_flow_code": [KeyError("stage_status")],
    "network_error": [ConnectionRefusedError("connection refused")],
    "always_transient": [StageFailed("register", 1, "503 Service Unavailable", transient=True)] * 9,
}

@flow(name="retry-wiring", persist_result=False)
def wiring():
    out = {}
    for name, errors in CASES.items():
        fut = failing(name, errors).submit()
        try:
            out[name] = fut.result()
        except BaseException as exc:
            out[name] = f"failed: {type(exc).__name__}"
    return out

@flow(name="push-outage", persist_result=False)
def push_outage(project_dir):
    """The real push task (`dvc push`) against an S3 endpoint nobody listens on."""
    from prefect.client.orchestration import get_client
    from flows.stages import dvc_push

    fut = dvc_push.with_options(**io_options(2, backoff_s=0.01)).submit(project_dir)
    fut.wait()
    with get_client(sync_client=True) as client:
        runs = client.read_task_run(fut.task_run_id).run_count
    try:
        fut.result()
        return {"runs": runs, "error": None}
    except StageFailed as exc:
        return {"runs": runs, "error": str(exc), "transient": exc.transient}

result = wiring()
pushed = push_outage(sys.argv[1])
print("RESULT " + json.dumps({"result": result, "attempts": attempts, "push": pushed}))
'''


@pytest.mark.slow
def test_io_retries_retry_only_transient_failures_in_a_real_flow(tmp_path):
    env = _clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"), AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                     AWS_DEFAULT_REGION="us-east-1")
    project = tmp_path / "proj"
    project.mkdir()
    (project / "blob.bin").write_bytes(b"x" * 1000)
    dead = f"http://127.0.0.1:{free_port()}"
    for cmd in ("git init -q", "dvc init -q", "dvc add -q blob.bin", "dvc remote add -d s3r s3://b/dvc",
                f"dvc remote modify s3r endpointurl {dead}"):
        subprocess.run(cmd, cwd=project, shell=True, env=env, check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(project)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(line[-1][len("RESULT "):])
    assert got["result"]["transient_then_ok"] == got["result"]["network_error"] == "ok"
    assert got["attempts"] == {"transient_then_ok": 3, "refused_input": 1, "bug_in_flow_code": 1,
                               "network_error": 2, "always_transient": 4}
    assert got["result"]["bug_in_flow_code"] == "failed: KeyError"
    assert got["result"]["always_transient"] == "failed: StageFailed"
    # the real push task: `dvc push` to an endpoint that is down is retried twice, then fails naming it
    push = got["push"]
    assert push["runs"] == 3 and push["transient"] is True, push
    assert "Could not connect to the endpoint URL" in push["error"] and dead in push["error"], push
