"""The rules of ``keel sweep``, checked before any trial runs (no Optuna, no Prefect here: flows/sweep.py runs it,
tasks/discipline/sweep.py is the command).

A sweep is a search compared on validation only, and only its best trial reaches the test split (``keel
promote``: one read, one registration). So its declaration in ``params.yaml:sweep`` must say:

- ``space``: the searched params, each a key of params.yaml in ``train.*`` or ``shard.*`` (what a trial, a
  ``dvc exp run train`` experiment, can change: everything upstream is the frozen data, everything downstream
  reads test) with a range (``low``/``high``, ``log`` for scale params) or ``choices``; never empty;
- ``objective``: a validation metric of ``paths.train_metrics`` (``best_val_accuracy``, ``best_val_loss``), never a
  test metric: choosing on test turns the test split into a second validation set;
- a budget: ``n_trials`` >= 1, ``concurrency`` >= 1, ``budget_minutes`` > 0 or null.

Every problem is reported at once, each naming its key and what to do."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.config import Params, SweepConfig, SweepSpace
from tasks.core.errors import ConfigError

# objective -> (the per-epoch validation value pruning reads, the direction that is better)
OBJECTIVES = {"best_val_accuracy": ("val_accuracy", "maximize"), "best_val_loss": ("val_loss", "minimize")}
SEARCHABLE = ("train", "shard")
STORAGE_ENV = "KEEL_SWEEP_STORAGE"
DEFAULT_DB = "data/sweeps/optuna.db"


class SweepError(ConfigError):
    """A sweep declaration that cannot run; raised before any trial starts."""


@dataclass(frozen=True)
class Dim:
    """One searched parameter as Optuna suggests it."""
    key: str
    kind: str                  # "int" | "float" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None


@dataclass(frozen=True)
class Plan:
    study: str
    storage: str
    dims: tuple[Dim, ...]
    fixed: dict[str, Any]
    objective: str
    intermediate: str          # per-epoch value reported for pruning
    direction: str
    n_trials: int
    concurrency: int
    budget_s: float | None
    sampler: str = "tpe"
    seed: int = 0
    pruning: bool = True
    startup_trials: int = 2
    warmup_epochs: int = 1


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items() if isinstance(d, dict) else ():
        out[f"{prefix}{k}"] = v
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _key_problem(where: str, key: str, flat: dict[str, Any]) -> str | None:
    section = key.split(".", 1)[0]
    if section not in SEARCHABLE or "." not in key:
        return (f"{where}: {key} cannot be searched: a trial is a `dvc exp run train` experiment, so only "
                f"{' and '.join(s + '.*' for s in SEARCHABLE)} settings change (the data up to split is frozen, "
                "evaluate and register read test)")
    if key not in flat:
        close = difflib.get_close_matches(key, [k for k in flat if k.split(".", 1)[0] in SEARCHABLE], n=1)
        hint = f"; did you mean {close[0]}?" if close else "; add it to params.yaml first if it is a setting"
        return f"{where}: unknown parameter {key} (no such key in params.yaml){hint}"
    if isinstance(flat[key], dict):
        return f"{where}: {key} is a section, not a setting; name one of its keys"
    return None


def _dim(key: str, sp: SweepSpace, current: Any) -> tuple[Dim | None, list[str]]:
    where = f"sweep.space.{key}"
    if sp.choices is not None:
        if sp.low is not None or sp.high is not None:
            return None, [f"{where}: give either choices or low/high, not both"]
        if not sp.choices:
            return None, [f"{where}: choices is empty"]
        return Dim(key, "categorical", choices=tuple(sp.choices)), []
    if sp.low is None or sp.high is None:
        return None, [f"{where}: needs low and high (a range) or choices (a list)"]
    problems = []
    if sp.low >= sp.high:
        problems.append(f"{where}: low ({sp.low:g}) must be below high ({sp.high:g})")
    if sp.log and sp.low <= 0:
        problems.append(f"{where}: a log range needs low > 0 (got {sp.low:g})")
    if isinstance(current, bool) or not isinstance(current, (int, float, type(None))):
        problems.append(f"{where}: {key} is {current!r} in params.yaml, not a number: search it with choices")
    whole = float(sp.low).is_integer() and float(sp.high).is_integer()
    kind = "int" if isinstance(current, int) and not isinstance(current, bool) and whole else "float"
    return (None if problems else Dim(key, kind, sp.low, sp.high, sp.log)), problems


def storage_url(cfg: SweepConfig, root: Path) -> str:
    """``sweep.storage``, else ``$KEEL_SWEEP_STORAGE`` (the cluster's Postgres), else the project's SQLite file."""
    url = cfg.storage or os.environ.get(STORAGE_ENV)
    if url:
        return url
    return f"sqlite:///{(root / DEFAULT_DB).resolve()}"  # its folder is made by the sweep, not by this check


def plan(params: Params, raw: dict[str, Any], root: Path) -> Plan:
    """The checked sweep of ``params`` (``raw``: params.yaml as read, for which keys exist); SweepError lists
    every problem, before any trial runs."""
    cfg = params.sweep
    flat = _flat(raw)
    problems: list[str] = []
    dims: list[Dim] = []
    if not cfg.space:
        problems.append("sweep.space is empty: name the params to search, e.g. "
                        "`train.lr: {low: 0.001, high: 0.01, log: true}`")
    for key, sp in cfg.space.items():
        bad = _key_problem(f"sweep.space.{key}", key, flat)
        if bad:
            problems.append(bad)
            continue
        dim, errs = _dim(key, sp, flat[key])
        problems += errs
        if dim:
            dims.append(dim)
    for key in cfg.fixed:
        bad = _key_problem(f"sweep.fixed.{key}", key, flat)
        if bad:
            problems.append(bad)
        elif key in cfg.space:
            problems.append(f"sweep.fixed.{key}: {key} is also in sweep.space; a key is searched or fixed")
    objective = cfg.objective
    if "test" in objective.lower():
        problems.append(f"sweep.objective: {objective} is a test metric: a sweep chooses on validation "
                        f"({', '.join(OBJECTIVES)}); the test split is read once, for the winner")
    elif objective not in OBJECTIVES:
        close = difflib.get_close_matches(objective, list(OBJECTIVES), n=1)
        problems.append(f"sweep.objective: {objective} is not a validation metric of {params.paths.train_metrics}; "
                        f"use one of {', '.join(OBJECTIVES)}" + (f" (did you mean {close[0]}?)" if close else ""))
    intermediate, better = OBJECTIVES.get(objective, ("val_accuracy", "maximize"))
    if cfg.direction and objective in OBJECTIVES and cfg.direction != better:
        problems.append(f"sweep.direction: {cfg.direction} would choose the worst {objective}; "
                        f"use {better} or null")
    if cfg.n_trials < 1:
        problems.append(f"sweep.n_trials is {cfg.n_trials}: a budget of no trials runs nothing; set it to >= 1")
    if cfg.concurrency < 1:
        problems.append(f"sweep.concurrency is {cfg.concurrency}: set it to >= 1 (trials at once)")
    if cfg.budget_minutes is not None and cfg.budget_minutes <= 0:
        problems.append(f"sweep.budget_minutes is {cfg.budget_minutes:g}: a budget of no time runs nothing; "
                        "set it > 0, or null for no time limit")
    if problems:
        raise SweepError(f"params.yaml: sweep: {len(problems)} problem(s), no trial was run:\n  "
                         + "\n  ".join(problems))
    return Plan(cfg.study, storage_url(cfg, root), tuple(dims), dict(cfg.fixed), objective, intermediate,
                better, cfg.n_trials, cfg.concurrency,
                None if cfg.budget_minutes is None else cfg.budget_minutes * 60.0, cfg.sampler, cfg.seed,
                cfg.pruning.enabled, cfg.pruning.startup_trials, cfg.pruning.warmup_epochs)


def overrides(values: dict[str, Any], fixed: dict[str, Any]) -> list[str]:
    """``dvc exp run -S`` arguments for one trial: its fixed and suggested values (``null`` for None)."""
    def fmt(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, float) else str(v)

    return [f"{k}={fmt(v)}" for k, v in {**fixed, **values}.items()]
