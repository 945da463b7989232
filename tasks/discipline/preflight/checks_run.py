"""The checks on the run's set-up, from the config and the git tree alone: items 6 (batch, LR, warmup,
schedule), 9 (reproducibility) and 10 (distributed)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from tasks.core import lineage
from tasks.core.config import TrainConfig
from tasks.discipline.preflight.report import CheckItem


# ---------------------------------------------------------------- 6. batch, LR, warmup, schedule
def batch_lr_schedule(cfg: TrainConfig) -> CheckItem:
    name = "batch_lr_schedule"
    effective = cfg.effective_batch or cfg.batch_size * cfg.devices
    scaled = cfg.lr * effective / cfg.reference_batch
    ev = {"batch_size": cfg.batch_size, "devices": cfg.devices, "effective_batch": effective,
          "accumulation": effective // (cfg.batch_size * cfg.devices), "base_lr": cfg.lr,
          "reference_batch": cfg.reference_batch, "scaling_rule": "linear", "scaled_lr": scaled,
          "warmup_steps": cfg.warmup_steps, "schedule": cfg.schedule, "lr_floor": cfg.lr_floor,
          "floor_lr": scaled * cfg.lr_floor}
    problems = []
    if effective > cfg.reference_batch and cfg.warmup_steps == 0:
        problems.append(f"effective batch {effective} > reference_batch {cfg.reference_batch} (scaled LR "
                        f"{scaled:.4g}) with train.warmup_steps: 0 — a large batch at the scaled LR from step 0 "
                        "diverges; set warmup_steps (a few hundred steps, or ~5% of training)")
    if cfg.lr_floor <= 0:
        problems.append("train.lr_floor is 0: the schedule decays to LR 0 and the last epochs learn nothing; set a "
                        "floor (e.g. 0.01-0.1 of the scaled LR)")
    if problems:
        return CheckItem(name, "fail", ev, "; ".join(problems))
    return CheckItem(name, "pass", ev, "none")


# ---------------------------------------------------------------- 9. reproducibility
def reproducibility(cfg: TrainConfig, allow_dirty: bool, root: str | Path, dry: dict | None) -> CheckItem:
    name = "reproducibility"
    git = lineage.git_state(root)
    dirty_files = lineage.dirty_files(root) or []  # dvc.lock aside: `dvc repro` rewrites it while it runs us
    ev = {"seed": cfg.seed, "deterministic": cfg.deterministic, "git_sha": git["git_sha"],
          "dirty_files": dirty_files, "allow_dirty": allow_dirty,
          "environment_hash": lineage.environment_hash(root)[:16],
          "logged_with_the_run": (dry or {}).get("params_logged"),
          "checkpoint_run_info": (dry or {}).get("run_info")}
    problems = []
    if not cfg.deterministic:
        problems.append("train.deterministic is false: two runs with the same seed can differ; set it true")
    if git["git_sha"] == "unknown":
        problems.append(f"{Path(root).resolve()} is not a git repository (or git is missing): the code version "
                        "cannot be logged; run from a git checkout")
    if dirty_files and not allow_dirty:
        problems.append(f"the working tree has uncommitted changes to {', '.join(dirty_files)}: the run would log "
                        "a git SHA that is not the code that trained it; commit (or stash) them, or set "
                        "preflight.allow_dirty: true to accept a run that cannot be retrained exactly")
    run_info = (dry or {}).get("run_info") or {}
    absent = [k for k in ("git_sha", "environment_hash", "shard_index_sha256", "split_manifest_sha256")
              if dry is not None and dry.get("ran") and not run_info.get(k)]
    if absent:
        problems.append(f"the checkpoint's lineage lacks {absent}")
    if problems:
        return CheckItem(name, "fail", ev, "; ".join(problems))
    return CheckItem(name, "pass", ev, "none" if not dirty_files else
                     f"allowed by preflight.allow_dirty with {len(dirty_files)} uncommitted file(s)")


# ---------------------------------------------------------------- 10. distributed
def distributed(cfg: TrainConfig) -> CheckItem:
    name = "distributed"
    if cfg.devices == 1:
        return CheckItem(name, "skip", {"devices": 1}, "none (one process)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    nodes = max(1, int(os.environ.get("WORLD_SIZE", cfg.devices)) // cfg.devices)
    world = cfg.devices * nodes
    effective = cfg.effective_batch or cfg.batch_size * world
    ev = {"devices": cfg.devices, "nodes": nodes, "world_size": world, "backend": "nccl" if cuda else "gloo",
          "strategy": cfg.strategy, "batch_size": cfg.batch_size, "effective_batch": effective,
          "cuda_devices_here": torch.cuda.device_count() if cuda else 0}
    problems = []
    if effective % (cfg.batch_size * world):
        problems.append(f"effective_batch {effective} is not a multiple of batch_size x world size = "
                        f"{cfg.batch_size} x {world}; gradient accumulation needs a whole number of steps")
    else:
        ev["accumulation"] = effective // (cfg.batch_size * world)
    if cuda and torch.cuda.device_count() and torch.cuda.device_count() < cfg.devices:
        problems.append(f"train.devices={cfg.devices} but this node has {torch.cuda.device_count()} CUDA devices")
    if problems:
        return CheckItem(name, "fail", ev, "; ".join(problems))
    return CheckItem(name, "pass", ev, "none")
