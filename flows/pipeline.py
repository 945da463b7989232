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

A failed register gate is a failed flow run.  The register stage exits 0 when its gate refuses the model (that is
a verdict, not an error: ``reports/register.json`` has ``status: gate_failed`` and the checks), so every stage
succeeded, the result and the artifacts are published as above, and then the flow ends in the state
``GateFailed``: a state of type FAILED with that name (``prefect.states.Failed(name="GateFailed", ...)``), so
the UI, ``prefect flow-run ls``, automations and a deployment's caller see a failed run, not a Completed one.
Its message names the failed checks, e.g. ``register gate failed: test_accuracy 0.6100 <
register.min_test_accuracy 0.9; val_accuracy 0.6400 < register.min_val_accuracy 0.9 (the registry is
unchanged; report: reports/register.json)``; the result's ``register.gate_failed`` lists the same reasons and is
the state's data (persisted JSON, as for a Completed run).  This holds on a run where register was up to date
too: the verdict on the workspace's model stands until its params, data or the thresholds change.  The CLI
prints ``keel flow: <message>`` on stderr (and the result with ``--json``) and exits 3 (``EXIT_GATE_FAILED``; a
failing stage or a refused input exits 1).  Called from Python, ``pipeline(..., return_state=True)`` gives the
state; ``state.result(raise_on_failure=False)`` is the result dict (a plain call raises on a failed state).

Subprocesses run in the project folder with this interpreter's ``bin/`` first on PATH (``dvc``, ``keel``,
``torchrun`` of the same environment) and the project first on PYTHONPATH (the checkout's own ``tasks``).

Modules: this one is the flow and the CLI; ``flows.stages`` the Prefect tasks (and their retry policy),
``flows.dvc_run`` the DVC subprocesses, ``flows.overrides`` ``--set``, ``flows.multinode`` torchrun across nodes
and ``--join-train``, ``flows.artifacts`` the UI artifacts, ``flows.project`` the checkout and its subprocess
environment, ``flows.errors`` FlowError and StageFailed, ``flows.workspace`` the cluster's workspace volume.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import State, flow, get_run_logger
from prefect.states import Failed

from flows.artifacts import gate_failures, publish_artifacts, read_json
from flows.dvc_run import changed_stages, lock_summary, metrics_show
from flows.errors import FlowError, StageFailed

# torchrun_command is not used here: it is re-exported for tests/e2e/infra/test_multinode.py (with subprocess_env)
from flows.multinode import join_train, torchrun_command  # noqa: F401
from flows.overrides import apply_overrides
from flows.project import load_params, project_root, stage_names, subprocess_env, use_checkout
from flows.stages import dvc_push, io_options, is_io_bound, run_stage, run_train_multinode

FLOW_NAME = "keel-pipeline"
REGISTER_FIELDS = ("status", "model_name", "version", "aliases", "model_uri", "version_uri", "tracking_uri", "run_id")
GATE_FAILED = "gate_failed"          # reports/register.json status when the register gate refused the model
GATE_FAILED_STATE = "GateFailed"     # the flow run's final state then: type FAILED, this name
EXIT_GATE_FAILED = 3                 # the CLI's exit status then (1: a failing stage or a refused input)


def _forced_stages(stages: list[str], force: bool | list[str]) -> set[str]:
    forced = set(stages) if force is True else set(force or [])
    unknown = sorted(forced - set(stages))
    if unknown:
        raise FlowError(f"force: unknown stage(s) {unknown}; the stages are {stages}")
    return forced


def _check_nodes(nnodes: int, rdzv_endpoint: str | None) -> None:
    if nnodes < 1:
        raise FlowError(f"nnodes must be >= 1 (got {nnodes})")
    if nnodes > 1 and not rdzv_endpoint:
        raise FlowError("nnodes > 1 needs rdzv_endpoint (host:port of the c10d rendezvous, reachable by every node)")


def _run_stages(root: Path, stages: list[str], forced: set[str], params, io_opts: dict[str, Any],
                train_multinode: Callable[[bool], dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Every stage in the DAG's order, one task each; ``train_multinode(force)`` (nnodes > 1) runs train."""
    # One `dvc status` for the DAG: a stage it reports unchanged, with nothing upstream run in this flow, is what
    # `dvc repro -s` would skip, so its task skips it without another DVC start-up. From the first stage that
    # runs on, every later stage goes through `dvc repro -s` (what changed is then DVC's to decide).
    changed = None if forced >= set(stages) else changed_stages(root, subprocess_env(root))
    upstream_ran = False
    results: list[dict[str, Any]] = []
    for stage in stages:
        t0 = time.perf_counter()
        up_to_date = changed is not None and stage not in changed and not upstream_ran
        if stage == "train" and train_multinode is not None:
            res = train_multinode(stage in forced)
        else:
            runner = run_stage.with_options(**io_opts) if is_io_bound(stage, params) else run_stage
            res = runner(stage, str(root), stage in forced, up_to_date)
        res["task_seconds"] = round(time.perf_counter() - t0, 3)
        results.append(res)
        upstream_ran = upstream_ran or res["status"] != "skipped"
    return results


def _push(root: Path, push: bool, remote: str | None, io_opts: dict[str, Any], log) -> dict[str, Any]:
    if push:
        return dvc_push.with_options(**io_opts)(str(root), remote)
    log.info("dvc push skipped (push=False / --no-push)")
    return {"pushed": False, "remote": None, "detail": "disabled"}


@flow(name=FLOW_NAME, persist_result=True, result_serializer="json", validate_parameters=True)
def pipeline(overrides: list[str] | None = None, push: bool = True, remote: str | None = None,
             force: bool | list[str] = False, nnodes: int = 1, rdzv_endpoint: str | None = None,
             rdzv_id: str = "keel-train", rdzv_is_host: bool | None = None, io_retries: int = 3,
             project_dir: str | None = None) -> dict[str, Any] | State:
    """Run the keel DAG (dvc.yaml) stage by stage through DVC; see the module docstring.  Returns the result, or
    (the register gate refused the model) a ``GateFailed`` state carrying it.

    overrides: ``key=value`` params.yaml overrides (as ``dvc exp run -S``); push: ``dvc push`` afterwards;
    remote: DVC remote name to push to; force: True or a list of stage names to re-run even if unchanged;
    nnodes / rdzv_endpoint / rdzv_id / rdzv_is_host: multi-node training (c10d rendezvous); io_retries: retries
    of the IO-bound steps; project_dir: the keel checkout (default: the working directory).
    """
    log = get_run_logger()
    t_flow = time.perf_counter()
    root = project_root(project_dir)
    use_checkout(root)
    stages = stage_names(root)
    forced = _forced_stages(stages, force)
    _check_nodes(nnodes, rdzv_endpoint)
    applied = apply_overrides(root, overrides)
    if applied:
        log.info(f"params.yaml overrides applied: {applied}")
    params = load_params(root)  # validated again: params.yaml as the stages will read it
    io_opts = io_options(io_retries)

    def train_multinode(force_train: bool) -> dict[str, Any]:
        return run_train_multinode(str(root), nnodes, rdzv_endpoint, rdzv_id, rdzv_is_host, force_train)

    results = _run_stages(root, stages, forced, params, io_opts, train_multinode if nnodes > 1 else None)

    result: dict[str, Any] = {"project": str(root), "stages": results, "overrides": applied,
                              "dvc_lock": lock_summary(root), "metrics": metrics_show(root, subprocess_env(root))}
    # test.json is not a DVC metric (experiments compare on validation): the flow reports it beside them
    result["metrics"][params.paths.test_metrics] = read_json(root / params.paths.test_metrics)
    reg = read_json(root / params.paths.register_report) or {}
    result["register"] = {k: reg.get(k) for k in REGISTER_FIELDS}
    if reg.get("status") == GATE_FAILED:
        result["register"]["gate_failed"] = gate_failures(reg) or ["(no failed check in the report)"]
    result["push"] = _push(root, push, remote, io_opts, log)
    result["seconds"] = round(time.perf_counter() - t_flow, 3)
    publish_artifacts(root, params.paths, result)
    ran = [s["stage"] for s in results if s["status"] == "ran"]
    log.info(f"keel pipeline: ran {ran or 'nothing'}; skipped {[s['stage'] for s in results if s['stage'] not in ran]}; "
             f"register: {result['register'].get('status')} v{result['register'].get('version')}")
    if result["register"].get("status") == GATE_FAILED:
        message = gate_message(result["register"]["gate_failed"], params.paths.register_report)
        log.error(message)
        return Failed(name=GATE_FAILED_STATE, message=message, data=result)
    return result


def gate_message(reasons: list[str], report: str | Path) -> str:
    return f"register gate failed: {'; '.join(reasons)} (the registry is unchanged; report: {report})"


# ---------------------------------------------------------------------------------------------------------------
# command line


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
        state = pipeline(overrides=args.overrides, push=args.push, remote=args.remote, force=force,
                         nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                         rdzv_is_host=is_host, io_retries=args.io_retries, project_dir=args.project_dir,
                         return_state=True)
        gate_failed = state.is_failed() and state.name == GATE_FAILED_STATE
        # a Completed run's result, a GateFailed run's result (its data), else the flow's own error is raised
        result = state.result(raise_on_failure=not gate_failed)
    except (FlowError, StageFailed) as exc:
        print(f"keel flow: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    if gate_failed:
        print(f"keel flow: {state.message}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
