"""The keel pipeline as one Prefect flow: the stages of ``dvc.yaml``, in order, each run by DVC.

    python -m flows.pipeline                               # like `dvc repro`, plus artifacts and `dvc push`
    python -m flows.pipeline --set train.lr=0.002 --set train.epochs=4   # like `dvc exp run -S ...`
    python -m flows.pipeline --no-push --force train       # re-run train (and whatever it changes) regardless

One DAG definition.  The stage list and order come from ``dvc.yaml`` (its ``stages:`` mapping, written in DAG
order); each stage is one Prefect task that runs ``dvc repro --single-item <stage>`` (``-s``: that stage only,
not its upstream), so DVC decides exactly as it does locally whether the stage changed: an unchanged stage is
skipped, data versions stay DVC's (``dvc.lock`` and the DVC cache), and a flow run that failed at stage k
resumes at stage k when run again, because stages 1..k-1 are up to date.  To spare a DVC start-up per unchanged
stage (about 0.6 s each on a small CPU), the flow first asks ``dvc status`` once: a stage it reports unchanged,
with no stage before it run in this flow, is skipped by its task without starting DVC again (that is exactly
what ``dvc repro -s`` would decide); from the first stage that runs on, every stage goes through
``dvc repro -s``.  The tasks run sequentially; there is no Prefect caching (``NO_CACHE``): DVC is the cache.

Parameter overrides (``overrides=["train.lr=0.002"]``, CLI ``--set``) are applied the way ``dvc exp run -S``
applies them: DVC edits ``params.yaml`` in the workspace with Hydra's override grammar
(``dvc.utils.hydra.apply_overrides``; comments are kept, ``null`` is written as an empty value, ``+key=value``
adds a key that is not in the file).  Here the edit is made on a copy first and validated with
``tasks.core.config.load_params``; only a valid result replaces ``params.yaml``, before any stage runs.  A key that
does not exist fails at once with the key named (and the closest existing key suggested).  As with
``dvc exp run`` in the workspace, the edit stays: the next run without ``--set`` sees the same parameters (and
``dvc.lock`` records them).

Retries (with exponential backoff, ``io_retries`` attempts after the first) only where IO can fail: the ingest
stage when ``ingest.source`` is ``s3://...``, the register stage (registry calls) and ``dvc push``; and only on
failures that look transient (connection refused/reset, timeouts, throttling, 5xx): a data or config error is
not retried.  A failing stage fails the flow with ``StageFailed``, whose message is the stage's own error (the
``keel <stage>: error: ...`` lines of its stderr, else its stderr tail), not a generic CalledProcessError.

Training.  ``train.devices`` processes per node come from ``params.yaml`` (``dvc.yaml``'s train cmd is
``torchrun --standalone --nproc_per_node=${train.devices}``).  With ``nnodes > 1`` (given by the deployment,
with ``rdzv_endpoint``) the train task cannot use that cmd (``--standalone`` is a one-node rendezvous), so:

    1. ``dvc status train --json``: unchanged (and not forced) -> skipped, exactly as ``dvc repro`` would;
    2. run ``torchrun --nnodes=N --nproc_per_node=<train.devices> --rdzv_backend=c10d
       --rdzv_endpoint=<host:port> --rdzv_id=<rdzv_id> [--rdzv_conf=is_host=0|1] --max_restarts=3
       -m tasks.cli train`` on this node (``torchrun_command``);
    3. ``dvc commit --force train``, so ``dvc.lock`` records the params, deps and outputs as if
       ``dvc repro`` had run the stage (and the outputs go to the DVC cache for ``dvc push``).

    The other N-1 nodes run the same torchrun line with the same endpoint and id:
    ``python -m flows.pipeline --join-train --nnodes N --rdzv-endpoint ... --rdzv-id ... --wait-s S`` on each of
    them (on the cluster: the Indexed Job ``infra/k8s/train/join-train-job.yaml``, the endpoint being the headless
    Service that selects this flow run's pod).  ``--wait-s`` first waits, up to S seconds, until the endpoint
    accepts a TCP connection (this node's torchrun opens it when the train stage starts, after the earlier
    stages), printing progress every ~30 s; on timeout it exits 1 naming the endpoint.  The c10d store is hosted
    by the node whose address is the endpoint's host (torch decides by hostname, or ``rdzv_is_host`` says so
    explicitly).  Each node's torchrun is told its own address (``--local_addr``) when ``KEEL_LOCAL_ADDR`` is set
    (the pod IP on the cluster): the rank-0 node, whichever it is, publishes that address to the others, so pods
    need no resolvable host names.  Every node must see the same workspace (the shared ``keel-workspace``
    volume on the cluster, prepared by ``flows.workspace``): ranks read the shards and ``params.yaml`` there and
    global rank 0 writes ``models/``, ``metrics/`` and ``reports/train/`` there; the flow's node then commits them.

After every stage succeeded: ``dvc push`` to ``remote`` (a remote name), else to the DVC default remote, else
(neither configured) skipped with a log line; ``push=False`` (CLI ``--no-push``) skips it.  When
``KEEL_DVC_REMOTE_URL`` is set (the cluster's ConfigMap) and no remote is named, it is added as the local
(uncommitted) remote ``keel-env`` (endpoint from ``AWS_ENDPOINT_URL``) and used.

Result (persisted as JSON; also the return value): ``stages`` (per stage: ran / skipped / restored, the
command's and the task's seconds), ``overrides`` (key -> value as written), ``dvc_lock`` (sha256 of the file and
per-stage output md5s), ``metrics`` (``dvc metrics show --json``, per file), ``register`` (status, version,
aliases, model_uri, tracking_uri, ... from ``reports/register.json``) and ``push``.  Artifacts for people in the
UI: ``keel-data-audit``, ``keel-leakage``, ``keel-validation``, ``keel-training``, ``keel-test-metrics``,
``keel-model`` (+ ``keel-model-link``) and ``keel-run``.  A missing or malformed report is a warning, never a
failure.

Subprocesses run in the project folder with this interpreter's ``bin/`` first on PATH (``dvc``, ``keel``,
``torchrun`` of the same environment) and the project first on PYTHONPATH (the checkout's own ``tasks``).
"""
from __future__ import annotations

import argparse
import collections
import difflib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

FLOW_NAME = "keel-pipeline"
PARAMS_FILE = "params.yaml"
IO_RETRY_BACKOFF_S = 5.0      # first retry after ~5 s, then ~10 s, ~20 s (exponential, with jitter)
MULTINODE_MAX_RESTARTS = 3    # torchrun restarts of the whole worker group (training resumes from models/last.pt)
ENV_REMOTE = "keel-env"       # the local DVC remote made from KEEL_DVC_REMOTE_URL
LOCAL_ADDR_ENV = "KEEL_LOCAL_ADDR"  # this node's address for torchrun --local_addr (the pod IP on the cluster)
JOIN_POLL_S = 2.0             # --join-train --wait-s: a TCP connect to the rendezvous endpoint this often
JOIN_REPORT_S = 30.0          # ... and a progress line this often
_TRANSIENT = re.compile(
    r"connection refused|connection reset|connection aborted|broken pipe|timed out|timeout|"
    r"temporary failure in name resolution|name or service not known|could not connect|"
    r"endpointconnectionerror|slow ?down|throttl|too many requests|service unavailable|internalerror|"
    r"(?:status|code|http|error)\D{0,3}(?:429|500|502|503|504)\b|\((?:429|500|502|503|504)\)|"
    r"database is locked|remotedisconnected|"
    r"max retries exceeded", re.IGNORECASE)
_ERROR_LINE = re.compile(r"^keel [\w-]+: error:")


class FlowError(RuntimeError):
    """The flow cannot start (not a DVC project, bad overrides, inconsistent launch parameters)."""


class OverrideError(FlowError):
    """A ``--set`` override that does not apply to params.yaml; the message names the key."""


class StageFailed(RuntimeError):
    """A stage (or dvc push) exited non-zero; the message is the stage's own error text."""

    def __init__(self, stage: str, returncode: int, detail: str, transient: bool = False):
        self.stage, self.returncode, self.detail, self.transient = stage, returncode, detail, transient
        super().__init__(f"stage '{stage}' failed (exit {returncode}): {detail}")

    def __reduce__(self):  # picklable with its fields (Prefect may serialise a task's exception)
        return (StageFailed, (self.stage, self.returncode, self.detail, self.transient))


# ---------------------------------------------------------------------------------------------------------------
# plain helpers (no Prefect): the DAG, overrides, commands


def project_root(project_dir: str | os.PathLike | None = None) -> Path:
    root = Path(project_dir or os.getcwd()).resolve()
    if not (root / "dvc.yaml").is_file():
        raise FlowError(f"{root}: no dvc.yaml here; run from the keel project root or pass project_dir")
    return root


def use_checkout(root: Path) -> None:
    """Import ``tasks`` (the params schema) from this checkout, as the stage subprocesses do (PYTHONPATH), even
    when a worker loaded the flow from elsewhere or another copy of keel is installed in the environment."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def stage_names(root: Path) -> list[str]:
    """The stages of dvc.yaml, in the order written there (the DAG's order)."""
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    if not stages:
        raise FlowError(f"{root / 'dvc.yaml'}: no stages")
    return list(stages)


def subprocess_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    for k, v in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
        env.setdefault(k, v)
    env.update(extra or {})
    return env


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _schema_has(key: str) -> bool:
    from tasks.core.config import Params

    section, _, rest = key.partition(".")
    fields = {f.alias or name: f for name, f in Params.model_fields.items()}
    if section not in fields:
        return False
    if not rest:
        return True
    model = fields[section].annotation
    sub = rest.split(".")[0]
    return sub in getattr(model, "model_fields", {})


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    if not isinstance(d, dict):
        return []
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        out += _flat_keys(v, key + ".")
    return out


def _lookup(d: Any, key: str) -> tuple[bool, Any]:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return False, None
        d = d[part]
    return True, d


def apply_overrides(root: Path, overrides: list[str] | None, write: bool = True) -> dict[str, Any]:
    """Apply ``key=value`` overrides to params.yaml as ``dvc exp run -S`` does, validated before anything is
    written; returns {key: value as now in params.yaml}.  ``write=False`` only validates."""
    # "params.yaml:key=value" (dvc's form naming the file) is the same as "key=value"
    overrides = [o.strip().removeprefix(f"{PARAMS_FILE}:") for o in overrides or [] if o and o.strip()]
    if not overrides:
        return {}
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    from tasks.core.config import ConfigError, load_params

    params_path = root / PARAMS_FILE
    current = yaml.safe_load(params_path.read_text()) or {}
    keys = []
    for ov in overrides:
        key, eq, _ = ov.partition("=")
        key = key.strip()
        if not eq or not key:
            raise OverrideError(f"--set {ov!r}: expected KEY=VALUE, e.g. train.lr=0.002")
        bare = key.lstrip("+~")
        keys.append(bare)
        if key.startswith(("+", "~")):
            continue  # Hydra's add / delete: the result is validated below
        found, _ = _lookup(current, bare)
        if not found:
            if _schema_has(bare):
                raise OverrideError(f"--set {ov}: {bare} is not in {PARAMS_FILE} (it is a setting with its "
                                    f"default value); add it with --set +{ov}")
            close = difflib.get_close_matches(bare, _flat_keys(current), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise OverrideError(f"--set {ov}: unknown parameter {bare} (no such key in {PARAMS_FILE}){hint}")
    with tempfile.TemporaryDirectory(prefix="keel-params-") as tmp:
        trial = Path(tmp) / PARAMS_FILE
        shutil.copyfile(params_path, trial)
        try:
            dvc_apply_overrides(str(trial), overrides)
        except Exception as exc:  # noqa: BLE001 - dvc's InvalidArgumentError (Hydra parse/compose errors)
            cause = exc.__cause__ or exc
            raise OverrideError(f"--set {' '.join(overrides)}: {cause}") from None
        try:
            load_params(trial)
        except ConfigError as exc:
            msg = str(exc).replace(str(trial), f"{PARAMS_FILE} (with --set {' '.join(overrides)})")
            raise OverrideError(msg) from None
        new = yaml.safe_load(trial.read_text()) or {}
        if write and trial.read_bytes() != params_path.read_bytes():
            staged = params_path.with_name(f".{PARAMS_FILE}.flow-tmp")
            shutil.copyfile(trial, staged)
            os.replace(staged, params_path)
    return {k: _lookup(new, k)[1] for k in keys}


def torchrun_command(nproc_per_node: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str,
                     is_host: bool | None = None, max_restarts: int = MULTINODE_MAX_RESTARTS,
                     local_addr: str | None = None) -> list[str]:
    """The multi-node launch of the train stage on one node (every node runs the same line).  ``local_addr``:
    this node's address as the other nodes reach it (default: torch uses this host's FQDN)."""
    if nnodes < 2:
        raise FlowError("torchrun_command is for nnodes >= 2; one node runs dvc.yaml's --standalone cmd")
    _split_endpoint(rdzv_endpoint)
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    if is_host is not None:
        cmd.append(f"--rdzv_conf=is_host={int(bool(is_host))}")
    if local_addr:
        cmd.append(f"--local_addr={local_addr}")
    return cmd + [f"--max_restarts={max_restarts}", "-m", "tasks.cli", "train"]


def _split_endpoint(rdzv_endpoint: str | None) -> tuple[str, int]:
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    if not host or not port.isdigit():
        raise FlowError(f"rdzv_endpoint must be host:port (got {rdzv_endpoint!r})")
    return host, int(port)


def local_addr() -> str | None:
    """This node's address for torchrun (``KEEL_LOCAL_ADDR``; the pod IP on the cluster), else None."""
    return os.environ.get(LOCAL_ADDR_ENV, "").strip() or None


def wait_for_endpoint(rdzv_endpoint: str, wait_s: float, poll_s: float = JOIN_POLL_S,
                      report_s: float = JOIN_REPORT_S) -> float:
    """Wait until ``host:port`` accepts a TCP connection (the rendezvous host's torchrun is up); returns the
    seconds waited.  A name that does not resolve yet (the host's pod not scheduled) counts as not up.  Prints a
    progress line every ``report_s``; raises FlowError naming the endpoint after ``wait_s`` seconds."""
    host, port = _split_endpoint(rdzv_endpoint)
    print(f"join-train: waiting up to {wait_s:g} s for the rendezvous at {rdzv_endpoint}", flush=True)
    t0 = time.monotonic()
    next_report = t0 + report_s
    last = "not tried"
    while True:
        left = wait_s - (time.monotonic() - t0)
        try:
            with socket.create_connection((host, port), timeout=max(0.2, min(5.0, left))):
                waited = time.monotonic() - t0
                print(f"join-train: rendezvous {rdzv_endpoint} is up (waited {waited:.0f} s)", flush=True)
                return waited
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - t0 >= wait_s:
            raise FlowError(
                f"--join-train: nothing accepted a connection at {rdzv_endpoint} within {wait_s:g} s (last: {last}). "
                f"Check that the flow run with nnodes >= 2 and rdzv_endpoint={rdzv_endpoint} is running and has "
                "reached its train stage (its torchrun opens the rendezvous then; a train stage that DVC finds "
                f"unchanged is skipped and opens none), that {host} resolves from this node (on the cluster: the "
                "headless Service keel-flow-rdzv selects the flow-run pod through its keel.dev/rendezvous label) "
                f"and that port {port} is reachable (network policies)")
        if now >= next_report:
            print(f"join-train: waiting for the rendezvous at {rdzv_endpoint} ({now - t0:.0f} of {wait_s:g} s; "
                  f"{last})", flush=True)
            next_report += report_s
        time.sleep(max(0.0, min(poll_s, wait_s - (now - t0))))


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


def stage_status(stage: str, stdout: str) -> str:
    if f"Running stage '{stage}'" in stdout:
        return "ran"
    if "is cached - skipping run" in stdout:
        return "restored"
    return "skipped"


def run_logged(cmd: list[str], root: Path, env: dict[str, str], log=None) -> tuple[int, str, str]:
    """Run ``cmd``, streaming both streams line by line to ``log`` (a logger); returns (rc, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
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
    pump(proc.stdout, out, log.info if log else None)
    rc = proc.wait()
    t.join()
    return rc, "".join(out), "".join(err)


def _quiet(cmd: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          check=False)


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
    r = _quiet(dvc("metrics", "show", "--json"), root, env)
    if r.returncode != 0:
        return {"error": error_detail(r.stderr, r.stdout, 5)}
    try:
        data = json.loads(r.stdout or "{}")
    except json.JSONDecodeError:
        return {"error": f"unreadable output of dvc metrics show: {r.stdout[:200]!r}"}
    ws = data.get("", data.get("workspace", {})).get("data", {})
    return {path: v.get("data", v.get("error")) for path, v in ws.items()}


def changed_stages(root: Path, env: dict[str, str]) -> set[str] | None:
    """Stages that ``dvc status`` reports as changed (one DVC start-up for the whole DAG); None if unknown."""
    r = _quiet(dvc("status", "--json"), root, env)
    if r.returncode != 0:
        return None
    try:
        return set(json.loads(r.stdout or "{}"))
    except ValueError:
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry a StageFailed only when it looks like IO; anything else retries."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - a result that cannot be read: let the retry policy decide
            return True
    return exc.transient if isinstance(exc, StageFailed) else True


# ---------------------------------------------------------------------------------------------------------------
# tasks


@task(name="stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, project_dir: str, force: bool = False, up_to_date: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item [--force] <stage>``; raises StageFailed with the stage's own message.
    ``up_to_date``: DVC's status already says the stage is unchanged (and nothing upstream ran): skipped without
    starting DVC again."""
    log = get_run_logger()
    if up_to_date and not force:
        log.info(f"stage {stage}: unchanged (dvc status), skipped")
        return {"stage": stage, "status": "skipped", "forced": False, "command_seconds": 0.0}
    root = Path(project_dir)
    cmd = dvc("repro", "--single-item", *(["--force"] if force else []), stage)
    t0 = time.perf_counter()
    rc, out, err = run_logged(cmd, root, subprocess_env(root), log)
    seconds = time.perf_counter() - t0
    if rc != 0:
        # DVC exits 255 whatever the command's code; report the command's own ("..., exited with 1")
        m = re.search(r"failed to run: .*exited with (-?\d+)", err)
        raise StageFailed(stage, int(m.group(1)) if m else rc, error_detail(err, out),
                          transient=bool(_TRANSIENT.search(err[-4000:])))
    status = stage_status(stage, out)
    log.info(f"stage {stage}: {status} in {seconds:.2f} s")
    return {"stage": stage, "status": status, "forced": force, "command_seconds": round(seconds, 3)}


@task(name="train-multinode", task_run_name="train x{nnodes} nodes", cache_policy=NO_CACHE, persist_result=False)
def run_train_multinode(project_dir: str, nnodes: int, rdzv_endpoint: str, rdzv_id: str,
                        rdzv_is_host: bool | None = None, force: bool = False, stage: str = "train") -> dict:
    """Multi-node train: skip if DVC says unchanged, else torchrun with the c10d rendezvous + ``dvc commit``."""
    from tasks.core.config import load_params

    log = get_run_logger()
    root = Path(project_dir)
    env = subprocess_env(root)
    t0 = time.perf_counter()
    if not force:
        r = _quiet(dvc("status", stage, "--json"), root, env)
        if r.returncode != 0:
            raise StageFailed(stage, r.returncode, error_detail(r.stderr, r.stdout))
        if not json.loads(r.stdout or "{}"):
            log.info(f"stage {stage}: unchanged (dvc status), skipping")
            return {"stage": stage, "status": "skipped", "forced": False,
                    "command_seconds": round(time.perf_counter() - t0, 3)}
    nproc = load_params(root / PARAMS_FILE).train.devices
    cmd = torchrun_command(nproc, nnodes, rdzv_endpoint, rdzv_id, rdzv_is_host, local_addr=local_addr())
    log.info("multi-node train: " + " ".join(cmd))
    rc, out, err = run_logged(cmd, root, env, log)
    if rc != 0:
        raise StageFailed(stage, rc, error_detail(err, out))
    rc, out, err = run_logged(dvc("commit", "--force", stage), root, env, log)
    if rc != 0:
        raise StageFailed(stage, rc, "dvc commit after the multi-node run: " + error_detail(err, out))
    return {"stage": stage, "status": "ran", "forced": force, "nnodes": nnodes,
            "command_seconds": round(time.perf_counter() - t0, 3)}


def resolve_remote(root: Path, env: dict[str, str], remote: str | None) -> str | None:
    """The remote to push to: ``remote``; else KEEL_DVC_REMOTE_URL (added as the local remote keel-env); else
    DVC's default remote; else None."""
    if remote:
        return remote
    url = os.environ.get("KEEL_DVC_REMOTE_URL")
    if url:
        for cmd in (dvc("remote", "add", "--local", "--force", ENV_REMOTE, url),
                    *([dvc("remote", "modify", "--local", ENV_REMOTE, "endpointurl", os.environ["AWS_ENDPOINT_URL"])]
                      if os.environ.get("AWS_ENDPOINT_URL") and url.startswith("s3://") else [])):
            r = _quiet(cmd, root, env)
            if r.returncode != 0:
                raise StageFailed("push", r.returncode, "configuring KEEL_DVC_REMOTE_URL: " + error_detail(r.stderr))
        return ENV_REMOTE
    r = _quiet(dvc("remote", "default"), root, env)
    name = r.stdout.strip()
    return name if r.returncode == 0 and name else None


@task(name="dvc-push", cache_policy=NO_CACHE, persist_result=False)
def dvc_push(project_dir: str, remote: str | None = None) -> dict[str, Any]:
    log = get_run_logger()
    root = Path(project_dir)
    env = subprocess_env(root)
    name = resolve_remote(root, env, remote)
    if name is None:
        log.info("dvc push skipped: no DVC remote is configured (add one with `dvc remote add -d NAME URL`, "
                 "or set KEEL_DVC_REMOTE_URL)")
        return {"pushed": False, "remote": None, "detail": "no remote configured"}
    t0 = time.perf_counter()
    rc, out, err = run_logged(dvc("push", "--remote", name), root, env, log)
    if rc != 0:
        raise StageFailed("push", rc, error_detail(err, out), transient=bool(_TRANSIENT.search(err[-4000:])))
    return {"pushed": True, "remote": name, "detail": (out.strip().splitlines() or [""])[-1],
            "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------------------------------------------
# artifacts


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _artifact(log, name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a missing/malformed report must not fail a finished pipeline
        log.warning(f"artifact {name}: not published ({type(exc).__name__}: {exc})")


def publish_artifacts(root: Path, paths, result: dict[str, Any]) -> None:
    log = get_run_logger()

    def audit():
        a = _read_json(root / paths.audit_dir / "audit.json")
        if a is None:
            raise FileNotFoundError(f"{paths.audit_dir}/audit.json")
        per_class = a.get("per_class") or {}
        rows = [{"class": c, "count": n,
                 "median width": (per_class.get(c) or {}).get("width", {}).get("median"),
                 "median height": (per_class.get(c) or {}).get("height", {}).get("median"),
                 "mean brightness": _fmt((per_class.get(c) or {}).get("brightness", {}).get("mean"))}
                for c, n in (a.get("class_counts") or {}).items()]
        create_table_artifact(rows, key="keel-data-audit", description=(
            f"Data audit of {a.get('source')}: found {a.get('found')} = ingested {a.get('ingested')} + rejected "
            f"{a.get('rejected')} (reasons: {a.get('reject_reasons') or 'none'}); imbalance "
            f"{_fmt(a.get('imbalance_ratio'))}; modes {a.get('modes')}. Plots and contact sheet: {paths.audit_dir}/"))

    def leakage():
        lk = _read_json(root / paths.leakage_report)
        if lk is None:
            raise FileNotFoundError(paths.leakage_report)
        counts = lk.get("counts") or {}
        md = [f"# Split and leakage: {'passed' if lk.get('passed') else 'FAILED'}", "",
              "| split | items |", "|---|---:|", *[f"| {k} | {v} |" for k, v in counts.items()], "",
              (f"- leakage units: {lk.get('units')}; exact duplicate links {lk.get('exact_duplicate_links')}, "
               f"near duplicate links {lk.get('near_duplicate_links')}"),
              (f"- cross-split policy `{lk.get('cross_split_policy')}`: {len(lk.get('cross_split_items') or [])} "
               f"item(s) handled; frozen ids kept {lk.get('frozen_ids_kept')}"),
              f"- problems: {lk.get('problems') or 'none'}"]
        create_markdown_artifact("\n".join(md), key="keel-leakage", description=str(paths.leakage_report))

    def validation():
        s = _read_json(root / paths.validate_dir / "summary.json")
        if s is None:
            raise FileNotFoundError(f"{paths.validate_dir}/summary.json")
        md = [f"# Data validation: {'PASSED' if s.get('success') else 'FAILED'}", "",
              (f"{s.get('expectations')} expectations; classes ({s.get('classes_source')}): "
               f"{', '.join(map(str, s.get('classes') or []))}"), "",
              "| split | rows | classes present | imbalance | label TV distance from train |",
              "|---|---:|---:|---:|---:|"]
        n_classes = len(s.get("classes") or [])
        for split, v in (s.get("splits") or {}).items():
            md.append(f"| {split} | {v.get('rows')} | {len(v.get('class_counts') or {})}/{n_classes} | "
                      f"{_fmt(v.get('imbalance_ratio'))} | {_fmt(v.get('label_tv_distance'))} |")
        if s.get("failures"):
            md += ["", "Failures:", *[f"- {f}" for f in s["failures"]]]
        md += ["", f"Data Docs: {s.get('docs_index')}"]
        create_markdown_artifact("\n".join(md), key="keel-validation", description=f"{paths.validate_dir}/summary.json")

    def training():
        t = _read_json(root / paths.train_metrics)
        if t is None:
            raise FileNotFoundError(paths.train_metrics)
        md = ["# Training", "", "| metric | value |", "|---|---:|", *[f"| {k} | {_fmt(v)} |" for k, v in t.items()]]
        csv_path = root / paths.train_plots_dir / "epochs.csv"
        if csv_path.is_file():
            rows = [ln.split(",") for ln in csv_path.read_text().splitlines() if ln.strip()]
            head, body = rows[0], rows[1:]
            shown = body if len(body) <= 6 else body[:3] + [["..."] * len(head)] + body[-3:]
            md += ["", f"Epochs ({len(body)}; curves: {paths.train_plots_dir}/curves.png):", "",
                   "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
            md += ["| " + " | ".join(_fmt(float(c)) if c not in ("...", "") and not c.isdigit() else c
                                     for c in row) + " |" for row in shown]
        create_markdown_artifact("\n".join(md), key="keel-training", description=str(paths.train_metrics))

    def test_metrics():
        m = _read_json(root / paths.test_metrics)
        if m is None:
            raise FileNotFoundError(paths.test_metrics)
        create_table_artifact([{"metric": k, "value": _fmt(v)} for k, v in m.items()], key="keel-test-metrics",
                              description=f"{paths.test_metrics} (the one read of the sealed test split)")

    def model():
        r = _read_json(root / paths.register_report)
        if r is None:
            raise FileNotFoundError(paths.register_report)
        name, version, uri = r.get("model_name"), r.get("version"), r.get("tracking_uri") or ""
        failed = [c.get("name") for c in (r.get("gate") or {}).get("checks", []) if not c.get("passed")]
        md = [f"# Model: {r.get('status')}", "", f"- model: `{name}` version **{version}**",
              f"- aliases: {', '.join('@' + a for a in r.get('aliases') or []) or 'none'}",
              f"- model URI: `{r.get('model_uri')}` (version URI `{r.get('version_uri')}`)",
              f"- tracking URI: `{uri}`; run `{r.get('run_id')}`"]
        if failed:
            md.append(f"- gate failed: {', '.join(failed)}")
        serve = (r.get("serve") or {}).get("command")
        if serve:
            md.append(f"- serve: `MLFLOW_TRACKING_URI={uri} {serve}`")
        create_markdown_artifact("\n".join(md), key="keel-model", description=str(paths.register_report))
        if version is not None:
            if uri.startswith(("http://", "https://")):
                link, text = f"{uri.rstrip('/')}/#/models/{name}/versions/{version}", f"{name} v{version} in MLflow"
            else:
                link, text = r.get("version_uri") or f"models:/{name}/{version}", f"{name} v{version} ({uri})"
            create_link_artifact(link, link_text=text, key="keel-model-link", description="registered model version")

    def run_summary():
        md = ["# keel pipeline run", "", "| stage | status | command s | task s |", "|---|---|---:|---:|"]
        md += [f"| {s['stage']} | {s['status']}{' (forced)' if s.get('forced') else ''} | {s['command_seconds']} | "
               f"{s.get('task_seconds', '-')} |" for s in result["stages"]]
        md += ["", f"- overrides: {result['overrides'] or 'none'}",
               f"- dvc.lock sha256: `{result['dvc_lock']['sha256']}`",
               f"- push: {result['push']}", "", "| stage | output | md5 |", "|---|---|---|"]
        md += [f"| {st} | {path} | `{md5}` |" for st, outs in result["dvc_lock"]["stages"].items()
               for path, md5 in outs.items()]
        create_markdown_artifact("\n".join(md), key="keel-run", description="stages, overrides, data version")

    for name, fn in (("keel-data-audit", audit), ("keel-leakage", leakage), ("keel-validation", validation),
                     ("keel-training", training), ("keel-test-metrics", test_metrics), ("keel-model", model),
                     ("keel-run", run_summary)):
        _artifact(log, name, fn)


# ---------------------------------------------------------------------------------------------------------------
# the flow


@flow(name=FLOW_NAME, persist_result=True, result_serializer="json", validate_parameters=True)
def pipeline(overrides: list[str] | None = None, push: bool = True, remote: str | None = None,
             force: bool | list[str] = False, nnodes: int = 1, rdzv_endpoint: str | None = None,
             rdzv_id: str = "keel-train", rdzv_is_host: bool | None = None, io_retries: int = 3,
             project_dir: str | None = None) -> dict[str, Any]:
    """Run the keel DAG (dvc.yaml) stage by stage through DVC; see the module docstring.

    overrides: ``key=value`` params.yaml overrides (as ``dvc exp run -S``); push: ``dvc push`` afterwards;
    remote: DVC remote name to push to; force: True or a list of stage names to re-run even if unchanged;
    nnodes / rdzv_endpoint / rdzv_id / rdzv_is_host: multi-node training (c10d rendezvous); io_retries: retries
    of the IO-bound steps; project_dir: the keel checkout (default: the working directory).
    """
    from tasks.core.config import load_params

    log = get_run_logger()
    t_flow = time.perf_counter()
    root = project_root(project_dir)
    use_checkout(root)
    stages = stage_names(root)
    forced = set(stages) if force is True else set(force or [])
    unknown = sorted(forced - set(stages))
    if unknown:
        raise FlowError(f"force: unknown stage(s) {unknown}; the stages are {stages}")
    if nnodes < 1:
        raise FlowError(f"nnodes must be >= 1 (got {nnodes})")
    if nnodes > 1 and not rdzv_endpoint:
        raise FlowError("nnodes > 1 needs rdzv_endpoint (host:port of the c10d rendezvous, reachable by every node)")
    applied = apply_overrides(root, overrides)
    if applied:
        log.info(f"params.yaml overrides applied: {applied}")
    params = load_params(root / PARAMS_FILE)  # validated again: params.yaml as the stages will read it
    backoff = exponential_backoff(backoff_factor=IO_RETRY_BACKOFF_S)
    io_opts = {"retries": io_retries, "retry_delay_seconds": backoff, "retry_jitter_factor": 0.5,
               "retry_condition_fn": _retry_if_transient}

    env = subprocess_env(root)
    # One `dvc status` for the DAG: a stage it reports unchanged, with nothing upstream run in this flow, is what
    # `dvc repro -s` would skip, so its task skips it without another DVC start-up. From the first stage that
    # runs on, every later stage goes through `dvc repro -s` (what changed is then DVC's to decide).
    changed = None if forced >= set(stages) else changed_stages(root, env)
    upstream_ran = False
    results: list[dict[str, Any]] = []
    for stage in stages:
        t0 = time.perf_counter()
        up_to_date = changed is not None and stage not in changed and not upstream_ran
        if stage == "train" and nnodes > 1:
            res = run_train_multinode(str(root), nnodes, rdzv_endpoint, rdzv_id, rdzv_is_host, stage in forced)
        else:
            io_bound = stage == "register" or (stage == "ingest" and params.ingest.source.startswith("s3://"))
            runner = run_stage.with_options(**io_opts) if io_bound else run_stage
            res = runner(stage, str(root), stage in forced, up_to_date)
        res["task_seconds"] = round(time.perf_counter() - t0, 3)
        results.append(res)
        upstream_ran = upstream_ran or res["status"] != "skipped"

    result: dict[str, Any] = {"project": str(root), "stages": results, "overrides": applied,
                              "dvc_lock": lock_summary(root), "metrics": metrics_show(root, env)}
    reg = _read_json(root / params.paths.register_report) or {}
    result["register"] = {k: reg.get(k) for k in ("status", "model_name", "version", "aliases", "model_uri",
                                                  "version_uri", "tracking_uri", "run_id")}
    if push:
        result["push"] = dvc_push.with_options(**io_opts)(str(root), remote)
    else:
        log.info("dvc push skipped (push=False / --no-push)")
        result["push"] = {"pushed": False, "remote": None, "detail": "disabled"}
    result["seconds"] = round(time.perf_counter() - t_flow, 3)
    publish_artifacts(root, params.paths, result)
    ran = [s["stage"] for s in results if s["status"] == "ran"]
    log.info(f"keel pipeline: ran {ran or 'nothing'}; skipped {[s['stage'] for s in results if s['stage'] not in ran]}; "
             f"register: {result['register'].get('status')} v{result['register'].get('version')}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# command line


def join_train(nnodes: int, rdzv_endpoint: str, rdzv_id: str, project_dir: str | None = None,
               rdzv_is_host: bool | None = None, wait_s: float = 0.0) -> int:
    """A non-flow node of a multi-node training: the same torchrun line, no DVC (the flow's node commits).
    ``wait_s`` > 0: first wait that long at most for the rendezvous endpoint to accept connections (the
    project is read after that: on the cluster the flow's pod prepares the shared workspace before its train)."""
    _split_endpoint(rdzv_endpoint)
    if wait_s > 0:
        wait_for_endpoint(rdzv_endpoint, wait_s)
    root = project_root(project_dir)
    use_checkout(root)
    from tasks.core.config import load_params  # the project's own (after use_checkout)

    cmd = torchrun_command(load_params(root / PARAMS_FILE).train.devices, nnodes, rdzv_endpoint, rdzv_id,
                           rdzv_is_host, local_addr=local_addr())
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=root, env=subprocess_env(root), check=False).returncode


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.pipeline", description=(
        "Run keel's DVC pipeline as a Prefect flow (ephemeral local API unless PREFECT_API_URL is set)."))
    p.add_argument("--set", "-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="params.yaml override, as `dvc exp run -S` (repeatable), e.g. train.lr=0.002")
    p.add_argument("--no-push", dest="push", action="store_false", help="do not `dvc push` afterwards")
    p.add_argument("--remote", help="DVC remote to push to (default: KEEL_DVC_REMOTE_URL, else the default remote)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-run STAGE even if unchanged (repeatable; `all` for every stage)")
    p.add_argument("--nnodes", type=int, default=1, help="training nodes (>1: c10d rendezvous at --rdzv-endpoint)")
    p.add_argument("--rdzv-endpoint", help="host:port of the c10d rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="keel-train", help="rendezvous id, the same on every node")
    p.add_argument("--rdzv-is-host", choices=("0", "1"), help="whether this node hosts the c10d store")
    p.add_argument("--io-retries", type=int, default=3)
    p.add_argument("--project-dir", help="the keel checkout (default: the working directory)")
    p.add_argument("--json", action="store_true", help="print the flow's result as JSON on stdout")
    p.add_argument("--join-train", action="store_true",
                   help="only join a multi-node training as a non-flow node (no DVC, no Prefect)")
    p.add_argument("--wait-s", type=float, default=0.0, metavar="S",
                   help="with --join-train: wait up to S seconds for the rendezvous endpoint to accept connections "
                        "(the flow's node opens it when its train stage starts), then join; 0: join at once")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    is_host = None if args.rdzv_is_host is None else args.rdzv_is_host == "1"
    try:
        if args.join_train:
            if args.nnodes < 2 or not args.rdzv_endpoint:
                raise FlowError("--join-train needs --nnodes >= 2 and --rdzv-endpoint")
            return join_train(args.nnodes, args.rdzv_endpoint, args.rdzv_id, args.project_dir, is_host,
                              wait_s=args.wait_s)
        # fail fast, before Prefect starts, on a bad override (the flow validates again)
        root = project_root(args.project_dir)
        use_checkout(root)
        apply_overrides(root, args.overrides, write=False)
        force: bool | list[str] = True if "all" in args.force else args.force
        result = pipeline(overrides=args.overrides, push=args.push, remote=args.remote, force=force,
                          nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                          rdzv_is_host=is_host, io_retries=args.io_retries, project_dir=args.project_dir)
    except (FlowError, StageFailed) as exc:
        print(f"keel flow: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
