"""A real ``mlflow server`` on loopback for tests (SQLite backend, proxied local artifacts, one worker).

    with mlflow_server() as srv:
        client = MlflowClient(srv.uri)  # srv.uri == "http://127.0.0.1:<port>"
        ...

Everything it writes (``mlflow.db``, ``artifacts/``, ``server.log``) lives in one temp dir, removed afterwards.
``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` keeps it to the CLI process plus its uvicorn worker (with job
execution on it starts ~9 children).  The server runs in its own process group (the CLI is the leader): the
stop sends SIGTERM to the group, waits for every member to exit, then SIGKILLs whatever is left, and waits
again, so nothing outlives the block.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import http_ok, log_tail

HOST = "127.0.0.1"
QUIET_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


class MlflowServerError(RuntimeError):
    """The server could not be started; the message carries the tail of its log."""


@dataclass
class MlflowServer:
    uri: str
    port: int
    pid: int
    dir: Path
    log: Path


def mlflow_command() -> list[str]:
    """The ``mlflow`` CLI beside this interpreter (the venv's), else ``python -m mlflow``."""
    beside = Path(sys.executable).parent / "mlflow"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "mlflow"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    """True while any process (zombies aside) is still in process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # fields after the ")" that closes comm: state ppid pgrp ...
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def _wait_group(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.05)
    return not group_alive(pgid)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the whole group (CLI + uvicorn worker); SIGKILL what is left after ``timeout``; reap the leader."""
    pgid = proc.pid  # start_new_session=True: the CLI is the group leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    if not _wait_group(pgid, timeout if proc.returncode is None else 2.0):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)
    if not _wait_group(pgid, 10.0):
        raise MlflowServerError(f"processes of group {pgid} survived SIGKILL")


def _start(workdir: Path, port: int) -> subprocess.Popen:
    cmd = [*mlflow_command(), "server",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"),
           "--host", HOST, "--port", str(port), "--workers", "1"]
    env = dict(os.environ, **QUIET_ENV)
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(workdir / "server.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, uri: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if http_ok(f"{uri}/health"):
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def mlflow_server(workdir: str | Path | None = None, *, startup_timeout: float = 60.0,
                  attempts: int = 3) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on 127.0.0.1 (a free port) for the duration of the block; yields an ``MlflowServer``.

    ``workdir``: where mlflow.db, artifacts/ and server.log go (default: a fresh temp dir, removed afterwards).
    A start that fails (e.g. the port taken between the check and the bind) is retried on a new port.
    """
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="keel-mlflow-")) if own_dir else Path(workdir).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    proc = None
    try:
        errors = []
        for _ in range(attempts):
            port = free_port()
            uri = f"http://{HOST}:{port}"
            proc = _start(wd, port)
            if _wait_ready(proc, uri, startup_timeout):
                break
            errors.append(f"port {port}: exit code {proc.poll()}")
            stop(proc)
            proc = None
        else:
            raise MlflowServerError(f"mlflow server did not become ready ({'; '.join(errors)}); log tail:\n"
                                    + log_tail(wd / "server.log"))
        yield MlflowServer(uri=uri, port=port, pid=proc.pid, dir=wd, log=wd / "server.log")
    finally:
        if proc is not None:
            stop(proc)
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)
