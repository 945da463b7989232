"""``keel sweep``: a hyperparameter search declared in ``params.yaml:sweep``, as the Prefect flow ``keel-sweep``.

    keel sweep                      # run (or resume) the study, then promote its best trial: one test read
    keel sweep --no-promote         # stop after the search; `keel promote <experiment>` later
    keel sweep --fresh              # delete the study and start over

Optuna drives it (ask/tell in the flow): TPE (or random) sampling with ``sweep.seed``, median pruning on the
per-epoch validation value, the study in ``sweep.storage`` (default: SQLite in ``data/sweeps/``; on the cluster
``KEEL_SWEEP_STORAGE``, the team's Postgres). Each trial is one Prefect task run (``trial-<N>``) that runs
``dvc exp run --temp train -n <study>-<tag>-t<N> -S key=value ...``: a DVC experiment of the current commit that
trains and validates in its own temporary copy and process, never reaches evaluate, and so reads no test item;
up to ``sweep.concurrency`` run at once. Its training reports each epoch's val metric to the study
(``tasks.train.callbacks.sweep_pruning``); a pruned trial stops after that epoch and is told PRUNED.

- A trial that fails (its params refused, a diverged loss, a crash) is a Failed task run and a FAIL trial, with
  the stage's own error; the sweep goes on. A sweep fails only when it cannot start (the checks of
  ``tasks.discipline.sweep``, made before any trial) or when no trial completed.
- A killed sweep resumes: run it again. Finished trials (complete, pruned, failed) are kept; a trial left
  RUNNING by the killed sweep is marked FAIL (``interrupted``) and its params are enqueued again. The study
  remembers its commit: a resume on another commit is refused (its trials would not be comparable).
- ``sweep.budget_minutes``: no new trial starts after this long (trials in flight finish).
- MLflow: one parent run ``sweep <study>`` in the ``keel`` experiment (its params, one ``trial_value`` point per
  trial, the best value); every trial's training run is nested under it (``mlflow.parentRunId``) with the
  ``keel.sweep`` and ``keel.trial`` tags, its params and its val curves.
- At the end only the best complete trial is promoted (``tasks.discipline.promote.run``): applied, evaluated on
  test once, registered through the gate, and tagged with the sweep, the trial and the number of trials compared
  on validation (complete + pruned). ``reports/sweep.json`` and ``reports/sweep.png`` show every trial.

Only one ``keel sweep`` drives a study at a time on this machine (a lock file beside the SQLite study).

Trials as jobs (``keel sweep --trials-on FLOW/DEPLOYMENT``, the deployment ``keel-gpu-sweep`` on the cluster): each
trial task starts a flow run of a ``keel-sweep-trial`` deployment instead (one Kubernetes GPU Job per trial on the
keel-gpu pool) and waits for it; the trial trains in a copy of the project sharing its DVC cache
(flows/sweep_trial.py). The data stages are brought up to date once first; the study's code is the git commit or,
without .git (the cluster's workspace), a hash of the code and recipe; a resumed sweep cancels the jobs its killed
predecessor left running; the best trial is promoted by applying its overrides (its training is restored from the
run-cache).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.dvc_run import dvc, error_detail, run_logged
from flows.errors import FlowError
from flows.project import PARAMS_FILE, load_params, project_root, subprocess_env, use_checkout

FLOW_NAME = "keel-sweep"
REPORT = "reports/sweep.json"
PICTURE = "reports/sweep.png"
TRIAL_ENV = "KEEL_SWEEP_TRIAL"   # tasks.train.callbacks.sweep_pruning.ENV
RUN_TAGS_ENV = "KEEL_RUN_TAGS"   # tasks.train.entry.RUN_TAGS_ENV
EXPERIMENT = "keel"              # tasks.train.entry.EXPERIMENT: the trials' runs and the parent share it


class TrialFailed(RuntimeError):
    """A trial's ``dvc exp run`` exited non-zero; the message is the stage's own error."""


# ---------------------------------------------------------------------------------------------------------------
# before any trial


def check(root: Path):
    """The checked plan of ``params.yaml:sweep`` (``tasks.core.sweep.plan``), plus every range end and choice
    applied to a copy of params.yaml and validated by keel's schema, so a range keel refuses fails here, not in
    a trial. Raises the UserError that names the key."""
    from flows.overrides import OverrideError, apply_overrides
    from tasks.core import sweep as rules

    params = load_params(root)
    raw = yaml.safe_load((root / PARAMS_FILE).read_text()) or {}
    plan = rules.plan(params, raw, root)
    probes = [{d.key: v} for d in plan.dims for v in (d.choices or (d.low, d.high))]
    for probe in probes or [{}]:
        values = {k: (int(v) if d.kind == "int" else v) for d in plan.dims for k, v in probe.items() if k == d.key}
        try:
            apply_overrides(root, rules.overrides(values, plan.fixed), write=False)
        except OverrideError as exc:
            raise rules.SweepError(f"params.yaml: sweep: a trial with {values or plan.fixed} would be refused, no "
                                   f"trial was run:\n  {exc}") from None
    return params, plan


@contextlib.contextmanager
def _one_driver(root: Path, study: str) -> Iterator[None]:
    lock = root / "data" / "sweeps" / f"{study}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise FlowError(f"another keel sweep is driving study {study!r} (PID {fh.read().strip() or '?'}, lock "
                            f"{lock}); wait for it, or stop it and run keel sweep again to resume") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def _git_head(root: Path) -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise FlowError(f"{root}: not a git commit (`git rev-parse HEAD`: {r.stderr.strip()}); a sweep's trials "
                        "are DVC experiments of the current commit: commit first")
    return r.stdout.strip()


def _open_study(plan, head: str, fresh: bool, log):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _storage_errors(plan.storage):
        if fresh:
            with contextlib.suppress(KeyError):
                optuna.delete_study(study_name=plan.study, storage=plan.storage)
                log.info(f"study {plan.study}: deleted (--fresh)")
        study = optuna.create_study(study_name=plan.study, storage=plan.storage, direction=plan.direction,
                                    load_if_exists=True)
        study.sampler = _sampler(plan, len(study.get_trials(deepcopy=False)))
    attrs = study.user_attrs
    if not attrs.get("commit"):
        study.set_user_attr("commit", head)
        study.set_user_attr("tag", secrets.token_hex(2))   # experiment names stay unique across --fresh studies
        study.set_user_attr("objective", plan.objective)
    elif attrs["commit"] != head:
        raise FlowError(f"study {plan.study!r} was run on commit {attrs['commit'][:10]}, this is {head[:10]}: its "
                        "trials are experiments of that commit and would not be comparable. Check that commit out "
                        "to resume it, or start another study (sweep.study, or --fresh)")
    elif study.direction.name.lower() != plan.direction or attrs.get("objective") != plan.objective:
        raise FlowError(f"study {plan.study!r} optimised {attrs.get('objective')} ({study.direction.name.lower()}); "
                        f"params.yaml now says {plan.objective} ({plan.direction}): start another study "
                        "(sweep.study, or --fresh)")
    return study


def _sampler(plan, done: int):
    """The sampler of a sweep that finds ``done`` trials in its study. Seeded with ``sweep.seed`` and ``done``: a
    fresh study draws the same trials for the same seed, and a resumed one goes on with new draws; seeded with the
    seed alone, a resume would replay the first run's draws (the same params again: a retrained or run-cache-restored
    duplicate counted as another candidate)."""
    import optuna

    seed = None if plan.seed is None else (plan.seed if done == 0 else plan.seed * 1_000_003 + done) % 2**32
    return (optuna.samplers.TPESampler(seed=seed) if plan.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=seed))


@contextlib.contextmanager
def _storage_errors(storage: str) -> Iterator[None]:
    """A study storage that cannot be reached or logged into is a FlowError naming it (password masked) and what
    to check, not a database driver's traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from tasks.core.secrets import redact, redact_uri

    try:
        yield
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise FlowError(f"sweep study storage {redact_uri(storage)}: {redact(cause[0] if cause else type(exc).__name__)}"
                        f" (sweep.storage / KEEL_SWEEP_STORAGE; a Postgres password comes from PGPASSWORD, on the "
                        "cluster the Secret keel-postgres)") from None


def _recover(study, log) -> list:
    """Trials a killed sweep left RUNNING: FAIL (``interrupted``), their params enqueued again. Returns them."""
    import optuna

    left = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in left:
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        log.warning(f"trial {t.number} was left running by a sweep that stopped: marked FAIL (interrupted); "
                    "its params run again")
    return left


def _counted(study) -> int:
    """Trials that count against n_trials: complete, pruned and failed (an interrupted one runs again)."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in done and not t.user_attrs.get("interrupted"))


# ---------------------------------------------------------------------------------------------------------------
# MLflow: the sweep's parent run


def _tracking_uri(root: Path) -> str:
    from tasks.core import tracking

    return tracking.tracking_uri(root)


def _parent_run(root: Path, study, plan) -> str | None:
    """The sweep's MLflow run (created once per study, reopened on a resume); None when MLflow is off."""
    if os.environ.get("KEEL_TRACKING", "mlflow") == "off":
        return None
    from mlflow import MlflowClient

    from tasks.core.secrets import redact_uri

    client = MlflowClient(tracking_uri=_tracking_uri(root))
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="RUNNING")
            return run_id
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name=f"sweep {plan.study}",
                            tags={"keel.stage": "sweep", "keel.sweep": plan.study,
                                  "mlflow.source.git.commit": study.user_attrs.get("commit", "")})
    client.log_batch(run.info.run_id, params=[
        _param("sweep.objective", f"{plan.objective} ({plan.direction})"),
        _param("sweep.n_trials", plan.n_trials), _param("sweep.concurrency", plan.concurrency),
        _param("sweep.storage", redact_uri(plan.storage)),
        _param("sweep.space", json.dumps({d.key: [d.kind, d.low, d.high, d.log, d.choices] for d in plan.dims})),
        _param("sweep.fixed", json.dumps(plan.fixed))])
    study.set_user_attr("mlflow_run_id", run.info.run_id)
    return run.info.run_id


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


# ---------------------------------------------------------------------------------------------------------------
# one trial: a Prefect task


def _suggest(trial, dims) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "categorical":
            out[d.key] = trial.suggest_categorical(d.key, list(d.choices))
        elif d.kind == "int":
            out[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
        else:
            out[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
    return out


@task(name="trial", task_run_name="trial-{number}", cache_policy=NO_CACHE, retries=0)
def run_trial(root: str, number: int, name: str, sets: list[str], env: dict[str, str],
              train_metrics: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    """``dvc exp run --temp train -n NAME -S ...``: one trial trains and validates; its val metrics. A pruned
    trial ends Completed(name="Pruned")."""
    from flows.sweep_trial import outcome
    from tasks.core.project import experiments_of_head

    log = get_run_logger()
    started = time.time()
    cmd = dvc("exp", "run", "--temp", "train", "-n", name, *[a for s in sets for a in ("-S", s)])
    log.info(f"trial {number}: {' '.join(sets)}")
    rc, out, err = run_logged(cmd, Path(root), subprocess_env(Path(root), env), log=None)
    ended = time.time()
    if rc != 0:
        raise TrialFailed(f"trial {number} ({name}) failed: {error_detail(err, out)}")
    found = [c for c in experiments_of_head(Path(root), train_metrics) if c["name"] == name]
    if not found:
        raise TrialFailed(f"trial {number}: `dvc exp show` has no experiment {name} with validation metrics")
    result = {"number": number, "experiment": name, "rev": found[0]["rev"], "started": started, "ended": ended,
              "seconds": round(ended - started, 1), "metrics": found[0],
              # DVC's run-cache had this training (same params and data, e.g. the retry of a trial interrupted after
              # its training finished): restored, not retrained, so no new MLflow run
              "restored": "Stage 'train' is cached - skipping run" in out + err}
    return outcome(result, spec)


def _drive(root: Path, study, plan, params, parent_run: str | None, log, trials_on: str | None = None,
           head: str = "") -> list[dict[str, Any]]:
    """Ask, run up to ``concurrency`` trials at once, tell; until n_trials are counted or the budget is spent.
    ``trials_on``: a ``keel-sweep-trial`` deployment that runs each trial as its own flow run (a job)."""
    import optuna

    from flows.sweep_trial import run_trial_job
    from tasks.core.sweep import overrides

    t0 = time.monotonic()
    inflight: dict[Any, tuple[Any, str, dict[str, Any]]] = {}
    finished: list[dict[str, Any]] = []
    tag = study.user_attrs["tag"]
    while True:
        over = plan.budget_s is not None and time.monotonic() - t0 >= plan.budget_s
        while not over and len(inflight) < plan.concurrency and _counted(study) + len(inflight) < plan.n_trials:
            trial = study.ask()
            values = _suggest(trial, plan.dims)
            name = f"{plan.study}-{tag}-t{trial.number}"
            sets = overrides(values, plan.fixed)
            trial.set_user_attr("experiment", name)
            trial.set_user_attr("sets", sets)
            trial.set_user_attr("trials_on", trials_on or "local")
            spec = {"storage": plan.storage, "study": plan.study, "trial_id": trial._trial_id,
                    "intermediate": plan.intermediate, "startup_trials": plan.startup_trials,
                    "warmup_epochs": plan.warmup_epochs} if plan.pruning else None
            env = {RUN_TAGS_ENV: json.dumps({"keel.sweep": plan.study, "keel.trial": trial.number,
                                             **({"mlflow.parentRunId": parent_run} if parent_run else {})})}
            if spec:
                env[TRIAL_ENV] = json.dumps(spec)
            if trials_on:
                fut = run_trial_job.submit(str(root), trial.number, name, sets, env, trials_on, head, spec)
            else:
                fut = run_trial.submit(str(root), trial.number, name, sets, env, params.paths.train_metrics, spec)
            inflight[fut] = (trial, name, values)
        if not inflight:
            if over:
                log.warning(f"sweep.budget_minutes ({plan.budget_s / 60:g}) spent: no new trial starts")
            return finished
        concurrent.futures.wait([f.wrapped_future for f in inflight], timeout=30,
                                return_when=concurrent.futures.FIRST_COMPLETED)
        for fut in [f for f in inflight if f.wrapped_future.done()]:
            trial, name, values = inflight.pop(fut)
            fut.wait()  # the task's final state (fut.state alone can still read the API's Pending/Running)
            state = fut.state
            row = {"number": trial.number, "experiment": name, "params": values}
            if state.is_completed():
                res = fut.result()
                row.update({k: res[k] for k in ("rev", "started", "ended", "seconds", "restored")})
                value = res["metrics"].get(plan.objective)
                row["value"] = value
                if res.get("pruned_at_epoch") is not None:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    row["state"] = "PRUNED"
                elif isinstance(value, (int, float)):
                    study.tell(trial, float(value))
                    row["state"] = "COMPLETE"
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    row.update(state="FAIL", error=f"no {plan.objective} in {params.paths.train_metrics}")
            else:
                msg = state.message or str(state.name)
                with contextlib.suppress(Exception):
                    fut.result()
                study._storage.set_trial_user_attr(trial._trial_id, "error", msg[-2000:])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                row.update(state="FAIL", error=msg)
                log.error(f"trial {trial.number} failed; the sweep goes on: {msg[-1500:]}")
            log.info(f"trial {trial.number}: {row['state']} {plan.objective}={row.get('value')} {values}")
            _log_trial(root, parent_run, row)
            finished.append(row)


def _log_trial(root: Path, parent_run: str | None, row: dict[str, Any]) -> None:
    if parent_run and isinstance(row.get("value"), (int, float)):
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=_tracking_uri(root)).log_metric(parent_run, "trial_value", float(row["value"]),
                                                                 step=row["number"])


# ---------------------------------------------------------------------------------------------------------------
# the study's summary, the picture, the promotion


def _rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                     "experiment": t.user_attrs.get("experiment"), "sets": t.user_attrs.get("sets"),
                     "trials_on": t.user_attrs.get("trials_on", "local"), "error": t.user_attrs.get("error"),
                     "interrupted": bool(t.user_attrs.get("interrupted")),
                     "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
                     "started": t.datetime_start.isoformat() if t.datetime_start else None,
                     "ended": t.datetime_complete.isoformat() if t.datetime_complete else None})
    return rows


def _picture(path: Path, rows: list[dict[str, Any]], plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.core import io

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red"}
    for state, colour in colours.items():
        pts = [(r["number"], r["value"]) for r in rows if r["state"] == state and r["value"] is not None]
        if pts:
            ax.scatter(*zip(*pts), c=colour, label=state.lower())
    for r in rows:
        if r["state"] == "FAIL" and r["value"] is None:
            ax.axvline(r["number"], color="tab:red", alpha=0.3, linestyle=":")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{plan.objective} (validation)")
    ax.set_title(f"sweep {plan.study}: {plan.direction} {plan.objective}; dotted: failed trials")
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _promote(root: Path, name: str, register_report: str, log) -> dict[str, Any]:
    """``keel promote NAME --sweep-report reports/sweep.json``, through the CLI like any stage: one test read."""
    keel = Path(sys.executable).parent / "keel"
    cmd = [str(keel) if keel.exists() else "keel", "promote", name, "--sweep-report", REPORT]
    rc, out, err = run_logged(cmd, root, subprocess_env(root), log=log)
    if rc != 0:
        raise FlowError(f"`keel promote {name}` failed (exit {rc}): {error_detail(err, out)}")
    return json.loads((root / Path(register_report).parent / "promote.json").read_text())


@flow(name=FLOW_NAME, persist_result=True, result_serializer="json", validate_parameters=True)
def sweep(project_dir: str | None = None, promote: bool = True, fresh: bool = False,
          trials_on: str | None = None) -> dict[str, Any]:
    """Run (or resume) the study of params.yaml:sweep, then promote its best trial; see flows/sweep.py.
    ``trials_on``: a ``keel-sweep-trial`` deployment; each trial is then its own flow run (flows/sweep_trial.py)."""
    from flows.sweep_trial import cancel_jobs, check_deployment, code_rev, prepare_data

    log = get_run_logger()
    root = project_root(project_dir)
    use_checkout(root)
    params, plan = check(root)
    if trials_on:
        check_deployment(trials_on)
    head = code_rev(root) if trials_on else _git_head(root)
    with _one_driver(root, plan.study):
        study = _open_study(plan, head, fresh, log)
        left = _recover(study, log)
        interrupted = len(left)
        parent = _parent_run(root, study, plan)
        try:
            if trials_on:
                # a job of an interrupted trial may still run (its pod outlived the driver): stop it
                cancel_jobs(root, [t.user_attrs["experiment"] for t in left
                                   if t.user_attrs.get("trials_on", "local") != "local"], log)
                prepare_data(root, log)
            _end_interrupted_runs(root, parent, left, log)
            result = _search_then_promote(root, study, plan, params, parent, head, interrupted, promote, log,
                                          trials_on)
        except BaseException:
            _end_parent(root, parent, "FAILED")
            raise
        _end_parent(root, parent, "FINISHED")
    return result


def _end_interrupted_runs(root: Path, parent: str | None, left: list, log) -> None:
    """The MLflow runs of trials a killed sweep left running end KILLED (tagged ``keel.sweep.interrupted``), not
    RUNNING forever: the retry of each is a run of its own."""
    if not parent or not left:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=_tracking_uri(root))
    numbers = {str(t.number) for t in left}
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'")
    for run in runs:
        if run.data.tags.get("keel.trial") in numbers:
            client.set_tag(run.info.run_id, "keel.sweep.interrupted", "true")
            client.set_terminated(run.info.run_id, "KILLED")
            log.info(f"trial {run.data.tags['keel.trial']}: its MLflow run {run.info.run_id} ended KILLED")


def _end_parent(root: Path, parent: str | None, status: str) -> None:
    if parent:
        from mlflow import MlflowClient

        with contextlib.suppress(Exception):
            MlflowClient(tracking_uri=_tracking_uri(root)).set_terminated(parent, status)


def _search_then_promote(root: Path, study, plan, params, parent: str | None, head: str, interrupted: int,
                         promote: bool, log, trials_on: str | None = None) -> dict[str, Any]:
    import optuna

    from tasks.core import io
    from tasks.core.secrets import redact_uri

    before = _counted(study)
    log.info(f"sweep {plan.study}: {before} of {plan.n_trials} trials already done, {plan.concurrency} at "
             f"once; {plan.direction} {plan.objective} on validation")
    ran = _drive(root, study, plan, params, parent, log, trials_on, head)
    rows = _rows(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    compared = sum(1 for r in rows if r["state"] in ("COMPLETE", "PRUNED"))
    result: dict[str, Any] = {
        "study": plan.study, "storage": redact_uri(plan.storage), "commit": head,
        "objective": plan.objective, "direction": plan.direction, "n_trials": plan.n_trials,
        "trials_on": trials_on or "local",
        "resumed_done": before, "interrupted_requeued": interrupted, "ran_now": [r["number"] for r in ran],
        "trials": rows, "compared_on_validation": compared, "mlflow_run_id": parent}
    if not complete:
        io.write_json(root / REPORT, result)
        raise FlowError(f"sweep {plan.study}: no trial completed ({len(rows)} trials: "
                        f"{', '.join(sorted({r['state'] for r in rows}))}); see {REPORT}")
    best = study.best_trial
    result["best"] = {"number": best.number, "value": best.value, "params": best.params,
                      "experiment": best.user_attrs.get("experiment")}
    if parent:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=_tracking_uri(root))
        client.log_metric(parent, f"best_{plan.objective}", float(best.value))
        client.set_tag(parent, "keel.sweep.best_trial", str(best.number))
        client.set_tag(parent, "keel.sweep.best_experiment", result["best"]["experiment"])
    _picture(root / PICTURE, rows, plan)
    io.write_json(root / REPORT, result)
    if promote:
        result["promoted"] = _promote(root, result["best"]["experiment"], params.paths.register_report, log)
        io.write_json(root / REPORT, result)
    else:
        log.info(f"best trial {best.number} ({result['best']['experiment']}); promote it with "
                 f"`keel promote {result['best']['experiment']}`")
    return result


def main(promote: bool = True, fresh: bool = False, trials_on: str | None = None) -> dict[str, Any]:
    """``keel sweep``: the checks first (before Prefect starts), then the flow. Raises UserError / FlowError."""
    root = project_root()
    use_checkout(root)
    check(root)  # every sweep problem before any trial or server starts
    try:
        if trials_on:
            from flows.sweep_trial import check_target

            check_target(trials_on)
        state = sweep(project_dir=str(root), promote=promote, fresh=fresh, trials_on=trials_on, return_state=True)
        result = state.result(raise_on_failure=True)
    except FlowError as exc:
        from tasks.core.errors import DataError

        raise DataError(str(exc)) from None
    best = result.get("best") or {}
    print(f"keel sweep: {result['study']}: {len(result['trials'])} trials ({result['compared_on_validation']} "
          f"compared on validation), best trial {best.get('number')} {result['objective']}={best.get('value')}; "
          f"{REPORT}", file=sys.stderr)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--no-promote", dest="promote", action="store_false", help="search only; promote later")
    p.add_argument("--fresh", action="store_true", help="delete the study first and start over")
    p.add_argument("--trials-on", metavar="DEPLOYMENT", help="run each trial as a flow run of this keel-sweep-trial "
                   "deployment (e.g. keel-sweep-trial/keel-gpu-sweep-trial: one Kubernetes Job per trial); "
                   "default: `dvc exp run --temp` here")
    return p


if __name__ == "__main__":
    from tasks.core.errors import UserError

    a = _parser().parse_args()
    try:
        main(promote=a.promote, fresh=a.fresh, trials_on=a.trials_on)
    except UserError as exc:
        print(f"keel sweep: error: {exc}", file=sys.stderr)
        sys.exit(1)
