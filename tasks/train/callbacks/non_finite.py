"""Halt on the first non-finite step loss: the run ends FAILED, naming the step and the last good checkpoint.
The loss is the all-reduced global one, so every rank sees it and halts alike (no agreement needed)."""
from __future__ import annotations

import math

from tasks.train.callbacks import Callback


class NonFinite(Callback):
    name = "non_finite"

    def on_step_values(self, t, v) -> None:
        if math.isfinite(v.loss):
            return
        t.halt(f"non-finite loss ({v.loss}) at step {v.step}, epoch {v.epoch}; the last good checkpoint is "
               f"{t.last_path} (lower train.lr, check the data, or use train.grad_clip)", "non_finite_loss", v.step)
