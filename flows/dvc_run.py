"""DVC as subprocesses: the command lines, running them (streamed to the Prefect log, or quietly), reading what
they say (a stage's own error, ran / restored / skipped, ``dvc status``, ``dvc metrics show``, ``dvc.lock``) and
the remote ``dvc push`` goes to.

Not ``flows/dvc.py``: Prefect's entrypoint loader (``flows/pipeline.py:pipeline``) puts ``flows/`` itself first
on ``sys.path`` and leaves it there, so a module named ``dvc`` in it would shadow the ``dvc`` package for the
rest of the flow run (``dvc.utils.hydra`` in the overrides, for one)."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from flows.errors import StageFailed

ENV_REMOTE = "keel-env"       # the local DVC remote made from KEEL_DVC_REMOTE_URL
_ERROR_LINE = re.compile(r"^keel [\w-]+: error:")
_EXITED_WITH = re.compile(r"failed to run: .*exited with (-?\d+)")
TRANSIENT_TAIL = 4000         # a transient error is near the end of stderr; earlier lines are progress


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_logged(cmd: list[str], root: Path, env: dict[str, str], log=None,
               stall_s: float | None = None) -> tuple[int, str, str]:
    """Run ``cmd``, streaming both streams line by line to ``log`` (a logger); returns (rc, stdout, stderr).

    With ``stall_s``, a command that reads and writes nothing at all (files, pipes and sockets alike, from
    /proc/PID/io) for ``stall_s`` seconds is stopped by PID (its process group, SIGKILL) and reported as
    ``rc`` -9 with a ``keel: ... stopped`` line appended to stderr (see ``stalled``)."""
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                            start_new_session=stall_s is not None)
    out: list[str] = []
    err: collections.deque[str] = collections.deque(maxlen=400)

    def pump(stream, sink, level):
        for line in stream:
            sink.append(line)
            if log is not None and line.strip():
                level(line.rstrip())

    # stderr is the stages' progress and warnings as much as errors: logged at INFO too (errors raise below)
    t = threading.Thread(target=pump, args=(proc.stderr, err, log.info if log else None), daemon=True)
    t.start()
    done = threading.Event()
    killed: list[float] = []
    if stall_s is not None:
        w = threading.Thread(target=_watch_stall, args=(proc, stall_s, done, killed), daemon=True)
        w.start()
    pump(proc.stdout, out, log.info if log else None)
    rc = proc.wait()
    done.set()
    t.join()
    if killed:
        msg = (f"keel: `{' '.join(cmd[2:] if cmd[:2] == [sys.executable, '-m'] else cmd)}` read and wrote "
               f"nothing for {killed[0]:.0f} s (a hung transfer): stopped (PID {proc.pid}, SIGKILL)")
        err.append(msg + "\n")
        if log is not None:
            log.warning(msg)
        rc = -9
    return rc, "".join(out), "".join(err)


STALLED = "read and wrote nothing for"


def stalled(stderr: str) -> bool:
    """Whether ``run_logged`` stopped the command for making no progress."""
    return f"` {STALLED} " in stderr[-TRANSIENT_TAIL:]


def _io_chars(pid: int) -> int | None:
    """Bytes the process has read and written through any syscall (files, pipes, sockets); None if unknown."""
    import psutil

    try:
        io = psutil.Process(pid).io_counters()
    except (psutil.Error, AttributeError, NotImplementedError):
        return None
    return getattr(io, "read_chars", io.read_bytes) + getattr(io, "write_chars", io.write_bytes)


def _watch_stall(proc: subprocess.Popen, stall_s: float, done: threading.Event, killed: list[float]) -> None:
    last, since = None, time.monotonic()
    while not done.wait(min(1.0, stall_s / 4)):
        now = _io_chars(proc.pid)
        if now is None:           # no /proc/PID/io here (or the process is gone): no watchdog, nothing killed
            return
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= stall_s and proc.poll() is None:
            killed.append(time.monotonic() - since)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return


def run_quiet(cmd: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)


def error_detail(stderr: str, stdout: str = "", n: int = 20) -> str:
    """The stage's own message: its ``keel <stage>: error:`` line(s) with their indented continuation, else
    the last ``n`` non-empty lines of stderr (then stdout)."""
    lines = stderr.splitlines()
    picked: list[str] = []
    for i, line in enumerate(lines):
        if _ERROR_LINE.match(line.strip()) and line.strip() not in picked:
            picked.append(line.strip())
            for cont in lines[i + 1:i + 40]:
                if cont.startswith((" ", "\t")) and cont.strip():
                    picked.append(cont.rstrip())
                else:
                    break
    if picked:
        return "\n".join(picked)
    tail = [ln for ln in (stderr or stdout).splitlines() if ln.strip()][-n:]
    return "\n".join(tail) or "(no output)"


def looks_transient(stderr: str) -> bool:
    """Whether a failed command's stderr names a transient IO failure (the one classifier keel has, shared with
    register's registry calls).  Imported here, not at the top: ``tasks`` comes from the checkout (use_checkout)."""
    from tasks.core.retry import transient_text

    return transient_text(stderr[-TRANSIENT_TAIL:])


def repro_failed(stage: str, rc: int, out: str, err: str) -> StageFailed:
    """A failed ``dvc repro``: DVC exits 255 whatever the command's code, so the command's own is reported
    (``..., exited with 1``); the message is the stage's own error; transient when stderr says so."""
    m = _EXITED_WITH.search(err)
    return StageFailed(stage, int(m.group(1)) if m else rc, error_detail(err, out), transient=looks_transient(err))


def stage_status(stage: str, stdout: str) -> str:
    if f"Running stage '{stage}'" in stdout:
        return "ran"
    if "is cached - skipping run" in stdout:
        return "restored"
    return "skipped"


def changed_stages(root: Path, env: dict[str, str]) -> set[str] | None:
    """Stages that ``dvc status`` reports as changed (one DVC start-up for the whole DAG); None if unknown."""
    r = run_quiet(dvc("status", "--json"), root, env)
    if r.returncode != 0:
        return None
    try:
        return set(json.loads(r.stdout or "{}"))
    except ValueError:
        return None


def lock_summary(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        return {"sha256": None, "stages": {}}
    raw = path.read_bytes()
    lock = yaml.safe_load(raw) or {}
    stages = {name: {o["path"]: o.get("md5") for o in (st or {}).get("outs", []) if isinstance(o, dict)}
              for name, st in (lock.get("stages") or {}).items()}
    return {"sha256": hashlib.sha256(raw).hexdigest(), "stages": stages}


def metrics_show(root: Path, env: dict[str, str]) -> dict[str, Any]:
    r = run_quiet(dvc("metrics", "show", "--json"), root, env)
    if r.returncode != 0:
        return {"error": error_detail(r.stderr, r.stdout, 5)}
    try:
        data = json.loads(r.stdout or "{}")
    except json.JSONDecodeError:
        return {"error": f"unreadable output of dvc metrics show: {r.stdout[:200]!r}"}
    ws = data.get("", data.get("workspace", {})).get("data", {})
    return {path: v.get("data", v.get("error")) for path, v in ws.items()}


# read/connect timeouts (s) of the S3 remote keel configures: botocore's defaults (60 s read, per retry) let a push
# to a server that died mid-transfer hang for minutes before the flow's retry could start
REMOTE_TIMEOUTS = {"read_timeout": 20, "connect_timeout": 10}


# a push that reads and writes nothing for this long is hung, not slow: DVC's own S3 transfer can wait forever
# on a coroutine that lost its connection when the server died mid-transfer (treeverse/dvc#10374; 5 of 6 runs
# here). Three read timeouts: any live request has read, failed or been retried by then.
PUSH_STALL_S = 3 * REMOTE_TIMEOUTS["read_timeout"]


def push(root: Path, env: dict[str, str], remote: str, log=None, stall_s: float = PUSH_STALL_S) -> tuple[str, float]:
    """``dvc push --remote remote`` under the stall watchdog; returns (DVC's last line, seconds). A failure is
    ``StageFailed("push", ...)``, transient when the remote was unreachable or the push hung (the flow's push
    task retries those with backoff)."""
    t0 = time.perf_counter()
    rc, out, err = run_logged(dvc("push", "--remote", remote), root, env, log, stall_s=stall_s)
    if rc != 0:
        hung = stalled(err)
        detail = error_detail(err, out)
        if hung and STALLED not in detail:
            detail += "\n" + err.strip().splitlines()[-1]
        raise StageFailed("push", rc, detail, transient=hung or looks_transient(err))
    return (out.strip().splitlines() or [""])[-1], round(time.perf_counter() - t0, 3)


def resolve_remote(root: Path, env: dict[str, str], remote: str | None) -> str | None:
    """The remote to push to: ``remote``; else KEEL_DVC_REMOTE_URL (added as the local remote keel-env); else
    DVC's default remote; else None."""
    if remote:
        return remote
    url = os.environ.get("KEEL_DVC_REMOTE_URL")
    if url:
        for cmd in (dvc("remote", "add", "--local", "--force", ENV_REMOTE, url),
                    *([dvc("remote", "modify", "--local", ENV_REMOTE, "endpointurl", os.environ["AWS_ENDPOINT_URL"])]
                      if os.environ.get("AWS_ENDPOINT_URL") and url.startswith("s3://") else []),
                    *([dvc("remote", "modify", "--local", ENV_REMOTE, k, str(v)) for k, v in REMOTE_TIMEOUTS.items()]
                      if url.startswith("s3://") else [])):
            r = run_quiet(cmd, root, env)
            if r.returncode != 0:
                raise StageFailed("push", r.returncode, "configuring KEEL_DVC_REMOTE_URL: " + error_detail(r.stderr))
        return ENV_REMOTE
    r = run_quiet(dvc("remote", "default"), root, env)
    name = r.stdout.strip()
    return name if r.returncode == 0 and name else None
