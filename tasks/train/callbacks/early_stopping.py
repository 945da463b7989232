"""Stop when ``train.monitor`` has not improved for ``train.early_stopping_patience`` validations (0: never).
``evaluate`` returns the decision and its reason (as Lightning's ``_evaluate_stopping_criteria``); the ranks
agree on it, so all stop at the same epoch."""
from __future__ import annotations

from tasks.train.callbacks import Callback


class EarlyStopping(Callback):
    name = "early_stopping"
    checkpoint_key = "state"

    def __init__(self, monitor: str, patience: int | None):
        self.monitor, self.patience = monitor, patience
        self.bad_epochs = 0
        self.stopped_early = False

    def update(self, improved: bool) -> None:
        self.bad_epochs = 0 if improved else self.bad_epochs + 1

    def evaluate(self, best_epoch: int) -> tuple[bool, str | None]:
        if self.patience and self.bad_epochs >= self.patience:
            return True, f"no improvement of {self.monitor} for {self.bad_epochs} epochs; best epoch {best_epoch}"
        return False, None

    def on_validation_end(self, t, v) -> None:
        self.update(v.improved)
        best_epoch = t.callback("best_checkpoint").best_epoch
        stop, reason = self.evaluate(best_epoch)
        if t.dist.agree(stop):  # one decision for all ranks
            self.stopped_early = True
            t.logger.log_event("early_stop", reason or f"another rank stopped early; best epoch {best_epoch}",
                               t.state.step)
        if self.stopped_early:  # also when a resumed run had stopped: it ends after this epoch, as before
            t.request_stop("early_stop")

    def state_dict(self) -> dict:
        return {"bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early}

    def load_state_dict(self, d: dict) -> None:
        self.bad_epochs, self.stopped_early = d["bad_epochs"], d["stopped_early"]
