"""A stand-in for the Trainer: what the callbacks read and call, and nothing that trains."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from tasks.train.plan import BatchPlan
from tasks.train.state import TrainState, Validation
from tasks.train.step import Window


class FakeLogger:
    def __init__(self):
        self.events, self.metrics = [], []

    def log_event(self, name, detail, step):
        self.events.append((name, detail, step))

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


class FakeDist:
    def __init__(self, world=1, master=True, agree=None):
        self.world, self.master, self.device, self.fsdp = world, master, torch.device("cpu"), False
        self._agree = agree or (lambda flag: flag)
        self.agreed: list[bool] = []

    def agree(self, flag):
        self.agreed.append(flag)
        return self._agree(flag)

    def mean(self, value):
        return value

    def full_states(self, model, opt=None):
        return {k: v.clone() for k, v in model.state_dict().items()}, None


class FakeTrainer:
    def __init__(self, callbacks=(), dist=None, cfg=None, tmp: Path = Path("/nonexistent")):
        self.callbacks = list(callbacks)
        self.dist = dist or FakeDist()
        self.cfg = cfg or SimpleNamespace(model="tiny")
        self.state = TrainState()
        self.logger = FakeLogger()
        self.plan = BatchPlan(1, 32, 10, 100, 0.01)
        self.window = Window()
        self.model = self.eval_model = torch.nn.Linear(2, 2)
        self.last_path, self.best_path = tmp / "last.pt", tmp / "best.pt"
        self.preprocessing, self.run_info = {}, {}
        self.halted = self.stop_reason = None
        self.saved: dict[Path, dict] = {}
        self.rewraps = 0

    def callback(self, name):
        return next(cb for cb in self.callbacks if cb.name == name)

    def halt(self, reason, event, step):
        self.halted = reason
        self.logger.log_event(event, reason, step)

    def request_stop(self, reason):
        self.stop_reason = self.stop_reason or reason

    def save(self, path, blob):
        self.saved[path] = blob

    def rewrap(self):
        self.rewraps += 1

    def validate(self, epoch, val_loss, val_accuracy):
        """One epoch's end through the callbacks, as Trainer.fit fires it."""
        v = Validation(epoch, 1.0, val_loss, val_accuracy, val_accuracy)
        self.state.epoch = epoch + 1
        for cb in self.callbacks:
            cb.on_validation_end(self, v)
        return v
