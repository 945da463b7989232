"""Multi-node training: the torchrun line every node runs (c10d rendezvous), and the joining side of it
(``python -m flows.pipeline --join-train``: wait for the rendezvous, then the same torchrun line, no DVC, no
Prefect).  The flow's own node runs that line in its train task (flows.stages) and then commits the outputs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.errors import FlowError
from flows.project import load_params, project_root, subprocess_env, use_checkout

MULTINODE_MAX_RESTARTS = 3    # torchrun restarts of the whole worker group (training resumes from models/last.pt)
LOCAL_ADDR_ENV = "KEEL_LOCAL_ADDR"  # this node's address for torchrun --local_addr (the pod IP on the cluster)
JOIN_POLL_S = 2.0             # --join-train --wait-s: a TCP connect to the rendezvous endpoint this often
JOIN_REPORT_S = 30.0          # ... and a progress line this often


def split_endpoint(rdzv_endpoint: str | None) -> tuple[str, int]:
    host, _, port = (rdzv_endpoint or "").rpartition(":")
    if not host or not port.isdigit():
        raise FlowError(f"rdzv_endpoint must be host:port (got {rdzv_endpoint!r})")
    return host, int(port)


def torchrun_command(nproc_per_node: int, nnodes: int, rdzv_endpoint: str, rdzv_id: str,
                     is_host: bool | None = None, max_restarts: int = MULTINODE_MAX_RESTARTS,
                     local_addr: str | None = None) -> list[str]:
    """The multi-node launch of the train stage on one node (every node runs the same line).  ``local_addr``:
    this node's address as the other nodes reach it (default: torch uses this host's FQDN)."""
    if nnodes < 2:
        raise FlowError("torchrun_command is for nnodes >= 2; one node runs dvc.yaml's --standalone cmd")
    split_endpoint(rdzv_endpoint)
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    if is_host is not None:
        cmd.append(f"--rdzv_conf=is_host={int(bool(is_host))}")
    if local_addr:
        cmd.append(f"--local_addr={local_addr}")
    return cmd + [f"--max_restarts={max_restarts}", "-m", "tasks.cli", "train"]


def local_addr() -> str | None:
    """This node's address for torchrun (``KEEL_LOCAL_ADDR``; the pod IP on the cluster), else None."""
    return os.environ.get(LOCAL_ADDR_ENV, "").strip() or None


def _wait_timed_out(rdzv_endpoint: str, host: str, port: int, wait_s: float, last: str) -> FlowError:
    # what a person on the joining pod needs to look at, in the order it usually goes wrong
    return FlowError(
        f"--join-train: nothing accepted a connection at {rdzv_endpoint} within {wait_s:g} s (last: {last}). "
        f"Check that the flow run with nnodes >= 2 and rdzv_endpoint={rdzv_endpoint} is running and has "
        "reached its train stage (its torchrun opens the rendezvous then; a train stage that DVC finds "
        f"unchanged is skipped and opens none), that {host} resolves from this node (on the cluster: the "
        "headless Service keel-flow-rdzv selects the flow-run pod through its keel.dev/rendezvous label) "
        f"and that port {port} is reachable (network policies)")


def wait_for_endpoint(rdzv_endpoint: str, wait_s: float, poll_s: float = JOIN_POLL_S,
                      report_s: float = JOIN_REPORT_S) -> float:
    """Wait until ``host:port`` accepts a TCP connection (the rendezvous host's torchrun is up); returns the
    seconds waited.  A name that does not resolve yet (the host's pod not scheduled) counts as not up.  Prints a
    progress line every ``report_s``; raises FlowError naming the endpoint after ``wait_s`` seconds."""
    host, port = split_endpoint(rdzv_endpoint)
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
            raise _wait_timed_out(rdzv_endpoint, host, port, wait_s, last)
        if now >= next_report:
            print(f"join-train: waiting for the rendezvous at {rdzv_endpoint} ({now - t0:.0f} of {wait_s:g} s; "
                  f"{last})", flush=True)
            next_report += report_s
        time.sleep(max(0.0, min(poll_s, wait_s - (now - t0))))


def join_train(nnodes: int, rdzv_endpoint: str, rdzv_id: str, project_dir: str | None = None,
               rdzv_is_host: bool | None = None, wait_s: float = 0.0) -> int:
    """A non-flow node of a multi-node training: the same torchrun line, no DVC (the flow's node commits).
    ``wait_s`` > 0: first wait that long at most for the rendezvous endpoint to accept connections (the
    project is read after that: on the cluster the flow's pod prepares the shared workspace before its train)."""
    split_endpoint(rdzv_endpoint)
    if wait_s > 0:
        wait_for_endpoint(rdzv_endpoint, wait_s)
    root = project_root(project_dir)
    use_checkout(root)
    cmd = torchrun_command(load_params(root).train.devices, nnodes, rdzv_endpoint, rdzv_id,
                           rdzv_is_host, local_addr=local_addr())
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=root, env=subprocess_env(root), check=False).returncode
