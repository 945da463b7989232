"""The intervention signals (tasks.train.signals.SignalMonitor) fed from the read-back and the validation; what
they report becomes tracking events. Its state is ``last.pt["signals"]``."""
from __future__ import annotations

from tasks.train.callbacks import Callback
from tasks.train.signals import SignalMonitor


class SignalEvents(Callback):
    name = "signal_events"
    checkpoint_key = "signals"

    def __init__(self, monitor: SignalMonitor | None = None):
        self.monitor = monitor or SignalMonitor()

    def on_step_values(self, t, v) -> None:
        for sig in self.monitor.on_step(v.step, v.loss, v.grad_norm, skipped=bool(v.skipped)):
            t.logger.log_event(sig.name, sig.detail, sig.step)

    def on_validation_end(self, t, v) -> None:
        for sig in self.monitor.on_epoch(v.epoch, t.state.step, v.train_loss, v.val_loss, v.val_accuracy):
            t.logger.log_event(sig.name, sig.detail, sig.step)

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.monitor.load_state_dict(d)
