"""Where the project is, as opposed to where a stage happens to run.

``dvc exp run --temp`` and queued experiments run every stage in a temporary copy of the repository
(``.dvc/tmp/exps/...``) that DVC deletes afterwards. What must be the project's, not the copy's (the test-access
ledger, the tracking store with its model registry), is resolved from :func:`project_home`: ``KEEL_PROJECT_HOME``
when set (a sweep trial run as a job, ``flows.sweep_trial``, trains in a copy of the project it names this way);
else ``DVC_ROOT``, which DVC sets for every stage it runs and, for an experiment, points at the parent repository
rather than the executor's copy; else the working directory (``keel <stage>`` run by hand). A remote tracking
server (``MLFLOW_TRACKING_URI``) is configuration and wins over all of them (``tasks.core.tracking.tracking_uri``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.core.errors import DataError

EXP_METRIC = "best_val_accuracy"  # what experiments are compared and promoted on
HOME_ENV = "KEEL_PROJECT_HOME"


def project_home() -> Path:
    root = os.environ.get(HOME_ENV) or os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else Path.cwd().resolve()


def at_home(path: str | os.PathLike, root: Path | None = None) -> Path:
    """``path`` (a ``params.yaml:paths`` entry) in ``root`` (default: the project, not an experiment's copy)."""
    p = Path(path)
    return p if p.is_absolute() else (root or project_home()) / p


def dvc(args: list[str], cwd: Path, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    """``dvc ARGS`` in ``cwd`` with this interpreter's ``bin/`` first on PATH, so the stages it runs find the same
    environment's ``keel`` and ``torchrun``; never raises on a non-zero exit."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **kw.pop("env", {})}
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=capture, text=True, check=False, **kw)


def experiment_name() -> str | None:
    """The DVC experiment this stage runs in (``dvc exp run``, ``--temp``, the queue), else None."""
    return os.environ.get("DVC_EXP_NAME") or None


def experiment_refusal(stage: str) -> str | None:
    """Why ``stage`` (evaluate or register) must not run here, or None: inside a DVC experiment the candidates are
    compared on validation only; the test split is read once, for the one winner, by ``keel promote``."""
    name = experiment_name()
    if name is None:
        return None
    return (f"{stage} does not run inside a DVC experiment ({name!r}): experiments are compared on validation only, "
            "and the test split is read once, for the winner. Run experiments up to training with "
            "`dvc exp run train -S key=value` (or `--queue`/`--temp` the same way), compare them with "
            f"`dvc exp show`, then `keel promote {name}` evaluates and registers the one you choose")


def experiments_of_head(root: Path, train_metrics: str) -> list[dict]:
    """The experiments of HEAD that finished with validation metrics, as ``dvc exp show --json`` reports them."""
    r = dvc(["exp", "show", "--json", "--no-fetch"], root)
    if r.returncode != 0:
        raise DataError(f"`dvc exp show --json` failed in {root}: {r.stderr.strip()[-400:]}")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=False).stdout.strip()
    out = []
    for base in json.loads(r.stdout or "[]"):
        if base.get("rev") != head:
            continue
        for rng in base.get("experiments") or []:
            if ((rng.get("executor") or {}).get("state") or "success") != "success":
                continue  # queued, running or failed: not a candidate that was compared
            for exp in rng.get("revs") or []:
                data = exp.get("data") or {}
                metrics = ((data.get("metrics") or {}).get(train_metrics) or {}).get("data") or {}
                if isinstance(metrics.get(EXP_METRIC), (int, float)):
                    out.append({"name": rng.get("name") or exp.get("name"), "rev": exp.get("rev"),
                                EXP_METRIC: float(metrics[EXP_METRIC]), "best_val_loss": metrics.get("best_val_loss"),
                                "best_epoch": metrics.get("best_epoch")})
    return out
