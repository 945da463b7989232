"""A real PostgreSQL server on loopback for tests (the cluster's study storage for keel sweep).

    with postgres(password="...") as pg:
        pg.url("optuna")          # postgresql+psycopg2://keel@127.0.0.1:PORT/optuna (no password: libpq reads PGPASSWORD)

The server binaries are the machine's (Debian's ``postgresql`` package: /usr/lib/postgresql/<v>/bin, or on PATH).
A fresh cluster is made in a temp dir with ``initdb`` (superuser ``keel``, password authentication over TCP, no
Unix socket outside the temp dir), started with ``postgres`` itself on a free port on 127.0.0.1, and stopped by PID
(SIGINT: a fast shutdown, then SIGKILL if it has not exited). Postgres refuses to run as root: as root the server
runs as the ``postgres`` user (``runuser``), owning only its temp dir.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.mlflow_server import free_port
from tests.support.procs import log_tail

HOST = "127.0.0.1"
USER = "keel"


class PostgresError(RuntimeError):
    """The server could not be started; the message carries the tail of its log."""


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str
    pid: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}@{HOST}:{self.port}/{database}"


def bindir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``, or None when the machine has no PostgreSQL server."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres(password: str, databases: tuple[str, ...] = ("optuna",)) -> Iterator[Postgres]:
    bins = bindir()
    if bins is None:
        raise PostgresError("no PostgreSQL server binaries (initdb) on this machine: apt-get install postgresql")
    tmp = Path(tempfile.mkdtemp(prefix="keel-pg-"))
    data, log = tmp / "data", tmp / "server.log"
    pwfile = tmp / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    os.chmod(pwfile, 0o600)
    env = {**os.environ, "LC_ALL": "C", "PGPASSWORD": password}
    r = subprocess.run(_as_server_user([str(bins / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
                                        "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"]),
                       capture_output=True, text=True, env=env, check=False)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PostgresError(f"initdb failed ({r.returncode}): {r.stderr[-2000:]}")
    port = free_port()
    with open(log, "ab") as fh:
        if os.geteuid() == 0:
            shutil.chown(log, "postgres", "postgres")
        proc = subprocess.Popen(_as_server_user([str(bins / "postgres"), "-D", str(data), "-p", str(port),
                                                 "-h", HOST, "-k", str(tmp), "-c", "fsync=off"]),
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pid_file = data / "postmaster.pid"
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run([str(bins / "pg_isready"), "-h", HOST, "-p", str(port)], capture_output=True,
                                   check=False)
            if ready.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise PostgresError(f"postgres did not start on {HOST}:{port}:\n{log_tail(log, 40)}")
            time.sleep(0.3)
        for db in databases:
            subprocess.run([str(bins / "createdb"), "-h", HOST, "-p", str(port), "-U", USER, db], env=env,
                           check=True, capture_output=True)
        server_pid = int(pid_file.read_text().splitlines()[0])
        yield Postgres(port=port, password=password, pid=server_pid)
    finally:
        pids = [proc.pid]
        with contextlib.suppress(OSError, ValueError, IndexError):
            pids.append(int(pid_file.read_text().splitlines()[0]))
        for pid in pids:  # runuser's child is the postmaster: stop it by its own PID (fast shutdown)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)
        left = [p for p in pids if _alive(p)]
        assert not left, f"postgres processes left running: {left}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
