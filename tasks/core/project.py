"""Where the project is, as opposed to where a stage happens to run.

``dvc exp run --temp`` and queued experiments run every stage in a temporary copy of the repository
(``.dvc/tmp/exps/...``) that DVC deletes afterwards. What must be the project's, not the copy's (the test-access
ledger, the tracking store with its model registry), is resolved from :func:`project_home`: ``DVC_ROOT``, which DVC
sets for every stage it runs and, for an experiment, points at the parent repository rather than the executor's
copy; else the working directory (``keel <stage>`` run by hand). A remote tracking server (``MLFLOW_TRACKING_URI``)
is configuration and wins over both (``tasks.core.tracking.tracking_uri``)."""
from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else Path.cwd().resolve()


def at_home(path: str | os.PathLike) -> Path:
    """``path`` (a ``params.yaml:paths`` entry) in the project, not in an experiment's temporary copy."""
    p = Path(path)
    return p if p.is_absolute() else project_home() / p


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
