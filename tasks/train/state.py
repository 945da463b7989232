"""The loop's counters, and the format of ``last.pt["state"]`` (a run in flight resumes across code changes)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# last.pt["state"], exactly: TrainState's fields plus those of the best-checkpoint and early-stopping callbacks,
# then the running train-loss sums of the epoch a mid-epoch checkpoint interrupted and StepLog's rows (both absent
# from older last.pt files)
STATE_KEYS = ("step", "epoch", "next_batch", "best_metric", "best_epoch", "best_val_loss", "best_val_accuracy",
              "bad_epochs", "history", "stopped_early", "epoch_loss_sum", "epoch_micro_batches", "step_rows")
# what a fresh run starts from (the callbacks' own defaults must agree; tests/unit/train pins it)
FRESH = {"step": 0, "epoch": 0, "next_batch": 0, "best_metric": None, "best_epoch": -1, "best_val_loss": math.inf,
         "best_val_accuracy": 0.0, "bad_epochs": 0, "history": [], "stopped_early": False, "epoch_loss_sum": 0.0,
         "epoch_micro_batches": 0, "step_rows": []}


@dataclass
class TrainState:
    step: int = 0            # optimiser steps taken
    epoch: int = 0           # the epoch to run next
    next_batch: int = 0      # the micro-batch of ``epoch`` to start from (a mid-epoch SIGTERM checkpoint)
    history: list[dict] = field(default_factory=list)  # one record per validated epoch
    resumed_from: int = 0    # the step a resume started at (not checkpointed: it describes this process)
    # ``epoch``'s train-loss sum and micro-batch count before ``next_batch`` (0 at an epoch's start): the trainer
    # sets them at a mid-epoch stop and restores them into the step when it resumes there, so the epoch's mean
    # train loss is the uninterrupted run's
    epoch_loss_sum: float = 0.0
    epoch_micro_batches: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "next_batch": self.next_batch, "history": self.history}

    def epoch_sums(self) -> dict:
        """The interrupted epoch's running sums, as last.pt["state"] holds them next to ``state_dict()``."""
        return {"epoch_loss_sum": self.epoch_loss_sum, "epoch_micro_batches": self.epoch_micro_batches}

    def load_state_dict(self, d: dict) -> None:
        """``d``: last.pt["state"]; one written before the sums were saved resumes them from 0, as it did."""
        self.step, self.epoch, self.next_batch, self.history = d["step"], d["epoch"], d["next_batch"], d["history"]
        self.epoch_loss_sum = float(d.get("epoch_loss_sum", 0.0))
        self.epoch_micro_batches = int(d.get("epoch_micro_batches", 0))


@dataclass
class TrainResult:
    best_val_accuracy: float
    best_val_loss: float
    best_epoch: int
    steps: int
    epochs_run: int
    stopped_early: bool
    resumed_from_step: int


@dataclass
class StepValues:
    """One optimiser step's scalars, on the host (read back once per log window)."""
    step: int
    epoch: int
    loss: float
    grad_norm: float
    lr: float
    skipped: bool | None = None  # fp16: the GradScaler skipped this update (inf/NaN grads); None: no scaler


@dataclass
class Validation:
    """One epoch's end: its mean train loss and the validation of the evaluated (EMA, when on) weights."""
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_accuracy_single_view: float
    improved: bool = False  # set by the best-checkpoint callback, read by early stopping and the epoch line
