"""Sweep trials as jobs: the flow ``keel-sweep-trial`` (one trial, its own flow run) and the sweep's task that runs
it through a deployment.

    keel sweep --trials-on keel-sweep-trial/keel-gpu-sweep-trial     # on the cluster: one Kubernetes Job per trial
    keel sweep --trials-on keel-sweep-trial/keel-local-sweep-trial   # the same through a local process worker

Without ``--trials-on`` a trial is ``dvc exp run --temp train`` in the sweep's own process tree (flows.sweep). On
the GPU cluster that cannot work: a trial needs its own pod and GPUs, and the workspace volume has no ``.git``
(``flows.workspace`` sets ``core.no_scm``), so there are no DVC experiments. With ``--trials-on DEPLOYMENT`` the
sweep's task ``trial-<N>`` starts one flow run of that deployment per trial (``run_deployment``, linked as a subflow
of the task run, named after the trial) and waits for it; the work pool makes the job (keel-gpu: a Kubernetes Job
from infra/prefect/k8s-base-job-template.json, whose pull step prepares the same workspace volume; the
deployment's ``concurrency_limit`` bounds how many GPUs the sweep holds). The trial flow, in the project (the
workspace the driver uses too):

1. refuses to run on code other than the study's (``code_rev``: the git commit, else a hash of the code and recipe
   files), so every trial of a study trains the same code;
2. copies the project into ``.dvc/tmp/keel-trials/<name>`` (``flows.workspace.trial_copy``: code, recipe,
   ``dvc.lock``, core.no_scm, the project's own DVC cache and run-cache), as ``dvc exp run --temp`` copies it;
3. applies the trial's overrides to the copy's params.yaml (``flows.overrides``: DVC's ``-S`` grammar, validated
   by keel's schema; a refused value fails the trial with the key named);
4. runs ``dvc repro train`` in the copy, with ``KEEL_PROJECT_HOME`` naming the project (its MLflow store, unless
   ``MLFLOW_TRACKING_URI`` names a server) and the sweep's run tags (nested under the sweep's MLflow run). The data
   stages are restored from the run-cache (the driver brought them up to date once before the first trial);
   evaluate is not a dependency of train, so no trial reads the test split;
5. writes its result (the val metrics of ``params.paths.train_metrics``, seconds, restored or trained) to
   ``data/sweeps/trials/<name>.json`` in the project, because a flow run's persisted result lives in its own pod
   while this folder is on the shared volume; then removes the copy. The training's outputs stay in the project's
   DVC cache and run-cache: promoting this trial later (``keel promote <name> --sweep-report ...``) applies the
   same overrides in the project, and ``dvc repro`` restores the training instead of running it again.

A failed trial flow run is a FAIL trial with the stage's own error; a pruned one ends ``Completed(name="Pruned")``
(the pruning callback asks the study, ``KEEL_SWEEP_TRIAL``; the study's storage is given to the trial by the flow's
own configuration, never as a flow-run parameter, so a database password never reaches the Prefect API).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.dvc_run import dvc, error_detail, run_logged
from flows.errors import FlowError
from flows.project import load_params, project_root, subprocess_env, use_checkout

FLOW_NAME = "keel-sweep-trial"
COPIES = ".dvc/tmp/keel-trials"     # the trials' copies of the project (DVC ignores .dvc/tmp)
RESULTS = "data/sweeps/trials"      # one <name>.json per trial, read by the sweep
TRIAL_ENV = "KEEL_SWEEP_TRIAL"      # tasks.train.callbacks.sweep_pruning.ENV
HOME_ENV = "KEEL_PROJECT_HOME"      # tasks.core.project.HOME_ENV


class TrialFailed(RuntimeError):
    """A trial did not finish; the message is the stage's own error (or the flow run's state)."""


def code_rev(root: Path) -> str:
    """What a study's trials must all run: the git commit of ``root``, else (the cluster's workspace, no .git) the
    sha256 of the code and recipe files ``flows.workspace`` copies from the image, as ``tree-<16 hex>``."""
    import subprocess

    from flows.workspace import FILES, FOLDERS, _tree

    if (root / ".git").exists():
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
        if r.returncode == 0:
            return r.stdout.strip()
    h = hashlib.sha256()
    files = [*FILES, *(f"{d}/{rel}" for d in FOLDERS for rel in sorted(_tree(root / d)))]
    for rel in sorted(files):
        path = root / rel
        h.update(rel.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"(missing)") + b"\0")
    return f"tree-{h.hexdigest()[:16]}"


def _cache_dir(root: Path) -> Path:
    """The project's DVC cache (``dvc cache dir``: .dvc/cache unless its config names another), which the trial's
    copy shares."""
    import subprocess

    r = subprocess.run(dvc("cache", "dir"), cwd=root, env=subprocess_env(root), capture_output=True, text=True,
                       check=False)
    if r.returncode != 0 or not r.stdout.strip():
        raise FlowError(f"{root}: `dvc cache dir` failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def result_path(root: Path, name: str) -> Path:
    return root / RESULTS / f"{name}.json"


# ---------------------------------------------------------------------------------------------------------------
# the trial: its own flow run (a job)


def _trial_env(root: Path, copy: Path, env: dict[str, str]) -> dict[str, str]:
    """The stage's environment: the project as home, the sweep's run tags, and the pruning spec completed with the
    study's storage from this process's configuration (sweep.storage / KEEL_SWEEP_STORAGE / the project's SQLite)."""
    extra = {**env, HOME_ENV: str(root)}
    if TRIAL_ENV in extra:
        from tasks.core.sweep import storage_url

        spec = json.loads(extra[TRIAL_ENV])
        spec.setdefault("storage", storage_url(load_params(root).sweep, root))
        extra[TRIAL_ENV] = json.dumps(spec)
    return subprocess_env(copy, extra)


@flow(name=FLOW_NAME, persist_result=True, result_serializer="json", validate_parameters=True)
def sweep_trial(name: str, overrides: list[str], code_rev_expected: str, env: dict[str, str] | None = None,
                project_dir: str | None = None) -> dict[str, Any]:
    """Train and validate one sweep trial in a copy of the project; see flows/sweep_trial.py."""
    from flows.overrides import apply_overrides
    from flows.workspace import trial_copy
    from tasks.core import io

    log = get_run_logger()
    root = project_root(project_dir)
    use_checkout(root)
    mine = code_rev(root)
    if mine != code_rev_expected:
        raise FlowError(f"trial {name}: this job's code is {mine}, the study's is {code_rev_expected}: its "
                        "training would not be comparable (deploy the study's image/commit, or start another study)")
    copy = root / COPIES / name
    shutil.rmtree(copy, ignore_errors=True)  # a copy left by a killed job of this trial
    started = time.time()
    try:
        for line in trial_copy(root, copy, _cache_dir(root)):
            log.debug(line)
        applied = apply_overrides(copy, overrides)
        log.info(f"trial {name}: {applied}")
        rc, out, err = run_logged(dvc("repro", "train"), copy, _trial_env(root, copy, env or {}), log=log)
        if rc != 0:
            raise TrialFailed(f"trial {name} failed: {error_detail(err, out)}")
        params = load_params(copy)
        metrics = json.loads((copy / params.paths.train_metrics).read_text())
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    ended = time.time()
    result = {"experiment": name, "overrides": overrides, "code_rev": mine, "started": started, "ended": ended,
              "seconds": round(ended - started, 1), "metrics": metrics,
              "restored": "Stage 'train' is cached - skipping run" in out + err}
    io.write_json(result_path(root, name), result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the sweep's side: one task run per trial, waiting for the trial's flow run


def outcome(result: dict[str, Any], spec: dict[str, Any] | None):
    """A finished trial's task result: ``result`` with the epoch its pruning callback stopped it at (the study
    records it), and then ``Completed(name="Pruned")`` carrying it, so the UI tells pruned from complete trials."""
    result["pruned_at_epoch"] = None
    if spec:
        import optuna

        attrs = optuna.storages.get_storage(spec["storage"]).get_trial(spec["trial_id"]).user_attrs
        result["pruned_at_epoch"] = attrs.get("pruned_at_epoch")
    if result["pruned_at_epoch"] is not None:
        return Completed(name="Pruned", message=f"trial {result['number']} pruned after epoch "
                                                f"{result['pruned_at_epoch']} on validation", data=result)
    return result


def job_environment(env: dict[str, str], spec: dict[str, Any] | None) -> dict[str, str]:
    """The trial's environment as a flow-run parameter (stored by the Prefect API, shown in its UI): the run tags
    and the pruning spec without the study's storage URL, which may hold a password; the trial's own configuration
    supplies it (``_trial_env``)."""
    out = dict(env)
    if spec:
        out[TRIAL_ENV] = json.dumps({k: v for k, v in spec.items() if k != "storage"})
    return out


@task(name="trial", task_run_name="trial-{number}", cache_policy=NO_CACHE, retries=0)
def run_trial_job(root: str, number: int, name: str, sets: list[str], env: dict[str, str], deployment: str,
                  code_rev_expected: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    """One flow run of ``deployment`` (``keel-sweep-trial/...``) for this trial, waited for; its val metrics. The
    same result as ``flows.sweep.run_trial``; a pruned trial ends Completed(name="Pruned")."""
    from prefect.deployments import run_deployment

    log = get_run_logger()
    out = result_path(Path(root), name)
    out.unlink(missing_ok=True)
    job_env = job_environment(env, spec)
    log.info(f"trial {number}: {' '.join(sets)} as a flow run of {deployment}")
    fr = run_deployment(name=deployment, flow_run_name=name, idempotency_key=name, timeout=None,
                        parameters={"name": name, "overrides": sets, "code_rev_expected": code_rev_expected,
                                    "env": job_env})
    state = fr.state
    if state is None or not state.is_completed():
        kind = state.type.value if state else "unknown"
        raise TrialFailed(f"trial {number} ({name}): flow run {fr.id} of {deployment} ended {kind}"
                          f"{' (' + state.name + ')' if state and state.name else ''}: "
                          f"{(state.message if state else '') or 'no message'}")
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        raise TrialFailed(f"trial {number} ({name}): its flow run {fr.id} completed but left no readable result "
                          f"at {out} ({exc}); do the sweep and its trials share the project folder?") from None
    result = {"number": number, "experiment": name, "rev": None, "flow_run_id": str(fr.id),
              **{k: res[k] for k in ("started", "ended", "seconds", "restored", "metrics")}}
    return outcome(result, spec)


def check_target(name: str) -> None:
    """Before Prefect starts: ``name`` has the form ``flow/deployment`` and a Prefect server is configured."""
    from prefect.settings import PREFECT_API_URL

    if not name.partition("/")[2]:
        raise FlowError(f"--trials-on {name!r}: expected FLOW/DEPLOYMENT, e.g. {FLOW_NAME}/keel-gpu-sweep-trial")
    if not PREFECT_API_URL.value():
        raise FlowError(f"--trials-on {name}: trials as jobs need a Prefect server with that deployment and a worker "
                        "on its pool: set PREFECT_API_URL (without it a flow has only a temporary local API)")


def check_deployment(name: str) -> None:
    """``name`` (``flow/deployment``) is a deployment of this flow on the Prefect server the sweep talks to; else a
    FlowError naming it and what to do, before any trial is asked."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    check_target(name)
    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise FlowError(f"--trials-on {name}: no such deployment on {PREFECT_API_URL.value()}; deploy it from "
                            f"the project root (`prefect deploy --name {name.partition('/')[2]}`, prefect.yaml)") from None
    if not (found.entrypoint or "").endswith(":sweep_trial"):
        raise FlowError(f"--trials-on {name}: that deployment runs {found.entrypoint}, not "
                        "flows/sweep_trial.py:sweep_trial (a keel-sweep-trial deployment)")


def cancel_jobs(root: Path, names: list[str], log) -> list[str]:
    """The flow runs of these trials (interrupted: their driver was killed) that have not finished, set Cancelling,
    so their worker stops the job (a Kubernetes Job, a process) instead of training for nothing; their copies are
    removed. Returns the names of the runs cancelled."""
    if not names:
        return []
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelling

    cancelled = []
    with get_client(sync_client=True) as client:
        for fr in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names))):
            if fr.state is None or not fr.state.is_final():
                client.set_flow_run_state(fr.id, Cancelling(message="its sweep was interrupted; the trial runs again "
                                                                    "under a new number"), force=True)
                cancelled.append(fr.name)
                log.warning(f"trial job {fr.name} (flow run {fr.id}) outlived its sweep: cancelling it")
    for name in names:
        shutil.rmtree(root / COPIES / name, ignore_errors=True)
    return cancelled


def prepare_data(root: Path, log) -> None:
    """The stages before train brought up to date once in the project, so the trials restore them from the DVC
    cache instead of each running them (on the cluster: every trial pod ingesting the same data)."""
    from flows.project import stage_names

    stages = stage_names(root)
    upstream = stages[:stages.index("train")] if "train" in stages else []
    if not upstream:
        return
    log.info(f"bringing {', '.join(upstream)} up to date before the trials (`dvc repro {' '.join(upstream)}`)")
    rc, out, err = run_logged(dvc("repro", *upstream), root, subprocess_env(root), log=log)
    if rc != 0:
        raise FlowError(f"`dvc repro {' '.join(upstream)}` before the trials failed: {error_detail(err, out)}")

