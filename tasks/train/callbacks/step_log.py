"""The per-step rows (steps.csv, the tracking metrics): loss, LR, grad norm and the window's throughput, every
``log_every_steps`` and at the last step. Not checkpointed: a resumed run's steps.csv starts at the resume.

fp16: a step the GradScaler skipped has an inf/NaN grad norm by design (the overflow it absorbed), so a skipped
log step carries no ``grad_norm``; ``skipped_steps`` counts the window's skipped steps instead (fp16 runs only)."""
from __future__ import annotations

import time

from tasks.train.callbacks import Callback


class StepLog(Callback):
    name = "step_log"

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.rows: list[dict] = []
        self.skipped = 0  # skipped steps in the current log window

    def on_step_values(self, t, v) -> None:
        self.skipped += bool(v.skipped)
        if not t.plan.is_log_step(v.step, self.log_every):
            return
        w = t.window
        now = time.perf_counter()
        rec = {"train_loss": v.loss, "lr": v.lr, **({} if v.skipped else {"grad_norm": v.grad_norm}),
               **({"skipped_steps": self.skipped} if v.skipped is not None else {}),
               "images_per_s": w.imgs / max(now - w.t, 1e-9),
               "data_wait_fraction": w.wait / max(w.wait + w.busy, 1e-9)}
        t.logger.log_metrics(rec, v.step)
        self.rows.append({"step": v.step, **rec})
        self.skipped = 0
        w.reset(now)
