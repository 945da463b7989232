"""The epoch's progress bar (rank 0, on a terminal only: ``tasks.core.progress``): optimiser steps, step rate,
ETA and the latest train loss.

It moves on ``on_step_values``, that is at the loop's read-backs (every ``log_every_steps``), so it adds no
host-device sync and touches no tensor or RNG: the trained weights are the same with or without it. Its rate is
the steps read back per second, which at a read-back equals the steps done per second."""
from __future__ import annotations

from tasks.core import progress
from tasks.train.callbacks import Callback


class ProgressBar(Callback):
    name = "progress_bar"

    def __init__(self):
        self.bar = None
        self.pending = 0  # steps of the current read-back window not on the bar yet

    def on_epoch_start(self, t, epoch: int) -> None:
        self._close()
        if not t.dist.master:
            return
        done = t.state.next_batch // t.plan.accumulation  # a resume mid-epoch starts part-way
        steps = min(t.plan.steps_per_epoch, t.plan.total_steps - t.state.step + done)
        self.bar = progress.progress(total=steps, initial=done, desc=f"train: epoch {epoch}", unit="step")

    def on_step_values(self, t, v) -> None:
        if self.bar is None:
            return
        # a window's steps arrive together: move the bar once, at the window's last step (a log step or the
        # epoch's last), so that it shows the steps done, and its rate their pace
        self.pending += 1
        if t.plan.is_log_step(v.step, t.cfg.log_every_steps) or self.bar.n + self.pending >= self.bar.total:
            self.bar.set_postfix(loss=f"{v.loss:.4f}", refresh=False)
            self._flush()
            if self.bar.n >= self.bar.total:  # the epoch's last step: the final rate, then validation
                self._close()

    def on_stop(self, t, reason: str) -> None:
        self._close()

    def on_validation_end(self, t, v) -> None:
        self._close()  # before the epoch's line is printed

    def on_fit_end(self, t, status: str) -> None:
        self._close()

    def _flush(self) -> None:
        self.bar.update(self.pending)
        self.pending = 0

    def _close(self) -> None:
        if self.bar is not None:
            self._flush()  # a halt mid-window: the steps before the halted one
            self.bar.close()
            self.bar = None
