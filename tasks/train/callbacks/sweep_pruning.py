"""Pruning for a ``keel sweep`` trial: after each validation, rank 0 reports the epoch's val metric to the trial's
Optuna study and asks its pruner; the ranks agree, and a pruned trial stops after this epoch like an early stop
(its best.pt, metrics and curves are written as for any finished training; the sweep records it as PRUNED).

Active only when ``KEEL_SWEEP_TRIAL`` is set (by flows/sweep.py, for the trial's ``dvc exp run``): JSON
``{"storage", "study", "trial_id", "intermediate": "val_accuracy"|"val_loss", "startup_trials", "warmup_epochs"}``.
Not saved in last.pt: a resumed trial reports again from its resume epoch (Optuna keeps the first value of a step).
"""
from __future__ import annotations

import json
import os
import sys

from tasks.train.callbacks import Callback

ENV = "KEEL_SWEEP_TRIAL"
PRUNED = "pruned"


class SweepPruning(Callback):
    name = "sweep_pruning"

    def __init__(self, spec: dict):
        self.spec = spec
        self.trial = None
        self.pruned_at: int | None = None

    @classmethod
    def from_env(cls) -> SweepPruning | None:
        raw = os.environ.get(ENV)
        return cls(json.loads(raw)) if raw else None

    def on_fit_start(self, t) -> None:
        if not t.dist.master:
            return
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        s = self.spec
        pruner = optuna.pruners.MedianPruner(n_startup_trials=int(s.get("startup_trials", 2)),
                                             n_warmup_steps=int(s.get("warmup_epochs", 1)))
        study = optuna.load_study(study_name=s["study"], storage=s["storage"], pruner=pruner)
        self.trial = optuna.trial.Trial(study, int(s["trial_id"]))

    def on_validation_end(self, t, v) -> None:
        prune = False
        if self.trial is not None:
            value = v.val_loss if self.spec.get("intermediate") == "val_loss" else v.val_accuracy
            self.trial.report(float(value), v.epoch)
            prune = self.trial.should_prune()
        if t.dist.agree(prune):
            self.pruned_at = v.epoch
            reason = (f"pruned by the sweep after epoch {v.epoch}: {self.spec.get('intermediate', 'val_accuracy')} "
                      "below the median of earlier trials at this epoch")
            if self.trial is not None:
                self.trial.set_user_attr("pruned_at_epoch", v.epoch)
            t.logger.log_event(PRUNED, reason, t.state.step)
            if t.dist.master:
                print(f"keel train: {reason}", file=sys.stderr)
            t.request_stop(PRUNED)
