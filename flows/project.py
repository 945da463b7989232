"""The keel checkout a flow runs in: where it is, its stages (dvc.yaml), and the environment its subprocesses get.
No Prefect and no DVC import here: ``--join-train`` and the CLI's early checks use it before either is needed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from flows.errors import FlowError

PARAMS_FILE = "params.yaml"


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
    """This interpreter's ``bin/`` first on PATH (``dvc``, ``keel``, ``torchrun`` of the same environment) and the
    checkout first on PYTHONPATH (its own ``tasks``); telemetry off unless the caller's environment says otherwise."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    for k, v in (("DO_NOT_TRACK", "1"), ("DVC_NO_ANALYTICS", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
        env.setdefault(k, v)
    env.update(extra or {})
    return env


def load_params(root: Path):
    """params.yaml validated by the checkout's own schema.  Imported here, not at the top: ``tasks`` must come
    from ``root`` (``use_checkout`` runs first), not from whatever copy was on sys.path when flows was imported."""
    from tasks.core.config import load_params as load

    return load(root / PARAMS_FILE)
