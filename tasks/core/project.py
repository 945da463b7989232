"""Where the project is, as opposed to where a stage happens to run.

``dvc exp run --temp`` and queued experiments run every stage in a temporary copy of the repository
(``.dvc/tmp/exps/...``) that DVC deletes afterwards. What must be the project's, not the copy's (the test-access
ledger, the tracking store with its model registry), is resolved from :func:`project_home`: ``DVC_ROOT``, which DVC
sets for every stage it runs and, for an experiment, points at the parent repository rather than the executor's
copy; else the working directory (``keel <stage>`` run by hand). A remote tracking server (``MLFLOW_TRACKING_URI``)
is configuration and wins over both (``tasks.core.tracking.tracking_uri``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def project_home() -> Path:
    root = os.environ.get("DVC_ROOT")
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
