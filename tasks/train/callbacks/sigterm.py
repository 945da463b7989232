"""SIGTERM (a preempted node, ``kill``): the handler only sets a flag; at the next read-back the ranks agree to
stop, the last checkpoint is written mid-epoch, and the process exits 143 (the run is KILLED, resumable)."""
from __future__ import annotations

import signal

from tasks.train.callbacks import Callback


class SigTerm(Callback):
    name = "sigterm"

    def __init__(self):
        self.signum: int | None = None
        self._old = None

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def on_fit_start(self, t) -> None:
        self._old = signal.signal(signal.SIGTERM, self._handler)  # every rank: the stop is agreed at a read-back

    def on_read_back(self, t) -> None:
        if t.dist.agree(self.signum is not None):
            t.request_stop("sigterm")

    def on_stop(self, t, reason: str) -> None:
        if reason != "sigterm":
            return
        t.logger.log_event("sigterm", f"stopped at step {t.state.step}; checkpoint {t.last_path}", t.state.step)
        raise SystemExit(128 + signal.SIGTERM)

    def on_fit_end(self, t, status: str) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
