"""The per-step rows (steps.csv, the tracking metrics): loss, LR, grad norm and the window's throughput, every
``log_every_steps`` and at the last step. Not checkpointed: a resumed run's steps.csv starts at the resume."""
from __future__ import annotations

import time

from tasks.train.callbacks import Callback


class StepLog(Callback):
    name = "step_log"

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.rows: list[dict] = []

    def on_step_values(self, t, v) -> None:
        if not t.plan.is_log_step(v.step, self.log_every):
            return
        w = t.window
        now = time.perf_counter()
        rec = {"train_loss": v.loss, "lr": v.lr, "grad_norm": v.grad_norm,
               "images_per_s": w.imgs / max(now - w.t, 1e-9),
               "data_wait_fraction": w.wait / max(w.wait + w.busy, 1e-9)}
        t.logger.log_metrics(rec, v.step)
        self.rows.append({"step": v.step, **rec})
        w.reset(now)
