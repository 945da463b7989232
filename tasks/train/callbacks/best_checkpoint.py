"""Model selection: best.pt holds the evaluated weights (EMA when on) of the best epoch by ``train.monitor``
(val_accuracy: higher is better; val_loss: lower). It is what evaluate, register and serving load."""
from __future__ import annotations

import math

from tasks.train.callbacks import Callback


class BestCheckpoint(Callback):
    name = "best_checkpoint"
    checkpoint_key = "state"

    def __init__(self, monitor: str):
        self.monitor = monitor
        # best_metric is "higher is better" whatever the monitor (-val_loss for val_loss): last.pt's format
        self.best_metric: float | None = None
        self.best_epoch, self.best_val_loss, self.best_val_accuracy = -1, math.inf, 0.0

    def score(self, val_loss: float, val_accuracy: float) -> float:
        return val_accuracy if self.monitor == "val_accuracy" else -val_loss

    def is_better(self, score: float) -> bool:
        return self.best_metric is None or score > self.best_metric

    def on_validation_end(self, t, v) -> None:
        score = self.score(v.val_loss, v.val_accuracy)
        v.improved = self.is_better(score)
        if not v.improved:
            return
        self.best_metric, self.best_epoch = score, v.epoch
        self.best_val_loss, self.best_val_accuracy = v.val_loss, v.val_accuracy
        best_sd, _ = t.dist.full_states(t.eval_model)  # a collective under FSDP: every rank calls it
        if t.dist.master:
            t.save(t.best_path, {"model": best_sd, "epoch": v.epoch, "step": t.state.step, "val_loss": v.val_loss,
                                 "val_accuracy": v.val_accuracy, "model_name": t.cfg.model, "index": t.preprocessing,
                                 "run_info": t.run_info})

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                "best_val_accuracy": self.best_val_accuracy}

    def load_state_dict(self, d: dict) -> None:
        self.best_metric, self.best_epoch = d["best_metric"], d["best_epoch"]
        self.best_val_loss, self.best_val_accuracy = d["best_val_loss"], d["best_val_accuracy"]
