"""The flow's Prefect tasks: a DVC stage (``dvc repro --single-item``), the train stage across several nodes, and
``dvc push``.  None caches (``NO_CACHE``: DVC is the cache).  Retries are not set here but by the flow, through
``io_options``, and only on the tasks whose IO can fail (see ``is_io_bound``); ``retry_if_transient`` then
lets only a failure that looks transient be retried."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.dvc_run import (
    dvc,
    error_detail,
    push,
    repro_failed,
    resolve_remote,
    run_logged,
    run_quiet,
    stage_status,
)
from flows.errors import StageFailed
from flows.multinode import local_addr, torchrun_command
from flows.project import load_params, subprocess_env

IO_RETRY_BACKOFF_S = 5.0      # first retry after ~5 s, then ~10 s, ~20 s (exponential, with jitter)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only a failure that is IO. A StageFailed carries the stage's verdict
    (from its stderr); any other exception is judged by the one classifier keel has (its type, its cause chain,
    its message), so a bug in the flow's own code fails at once instead of being retried and hidden."""
    # imported here: tasks comes from the checkout (see dvc_run.looks_transient)
    from tasks.core.retry import transient_exception

    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - a result that cannot be read is no evidence of IO: do not retry
            return False
        if not isinstance(exc, BaseException):
            return False
    return exc.transient if isinstance(exc, StageFailed) else transient_exception(exc)


def io_options(io_retries: int, backoff_s: float = IO_RETRY_BACKOFF_S) -> dict[str, Any]:
    """``Task.with_options`` for an IO-bound task: ``io_retries`` retries with exponential backoff and jitter."""
    return {"retries": io_retries, "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_s),
            "retry_jitter_factor": 0.5, "retry_condition_fn": retry_if_transient}


def is_io_bound(stage: str, params) -> bool:
    """Where a stage's failure can be the network: register (registry calls), ingest from S3."""
    return stage == "register" or (stage == "ingest" and params.ingest.source.startswith("s3://"))


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
        raise repro_failed(stage, rc, out, err)
    status = stage_status(stage, out)
    log.info(f"stage {stage}: {status} in {seconds:.2f} s")
    return {"stage": stage, "status": status, "forced": force, "command_seconds": round(seconds, 3)}


@task(name="train-multinode", task_run_name="train x{nnodes} nodes", cache_policy=NO_CACHE, persist_result=False)
def run_train_multinode(project_dir: str, nnodes: int, rdzv_endpoint: str, rdzv_id: str,
                        rdzv_is_host: bool | None = None, force: bool = False, stage: str = "train") -> dict:
    """Multi-node train: skip if DVC says unchanged, else torchrun with the c10d rendezvous + ``dvc commit``
    (so dvc.lock records the stage as if ``dvc repro`` had run it, and its outputs are cached for push)."""
    log = get_run_logger()
    root = Path(project_dir)
    env = subprocess_env(root)
    t0 = time.perf_counter()
    if not force:
        r = run_quiet(dvc("status", stage, "--json"), root, env)
        if r.returncode != 0:
            raise StageFailed(stage, r.returncode, error_detail(r.stderr, r.stdout))
        if not json.loads(r.stdout or "{}"):
            log.info(f"stage {stage}: unchanged (dvc status), skipping")
            return {"stage": stage, "status": "skipped", "forced": False,
                    "command_seconds": round(time.perf_counter() - t0, 3)}
    nproc = load_params(root).train.devices
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
    detail, seconds = push(root, env, name, log)
    return {"pushed": True, "remote": name, "detail": detail, "seconds": seconds}
