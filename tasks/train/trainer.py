"""The training loop: ``Trainer.fit``. The loop with every event where it fires is drawn in
``tasks/train/callbacks/__init__.py``; the policies (resume, phases, SIGTERM, non-finite halt, signals, step
rows, best checkpoint, early stopping) are the callbacks there, fired in its ``ORDER``.

Per-step scalars (loss, grad norm) stay on the device and are read back together, once per ``log_every_steps``
and at the end of each epoch: one host sync per window instead of several per step, so the CPU keeps queueing
work while the GPU runs (small models are launch-bound). Every callback that needs a value runs in that window.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from tasks.core import checkpoint, io
from tasks.train import outputs
from tasks.train.errors import TrainError
from tasks.train.feed import micro_batches
from tasks.train.state import STATE_KEYS, StepValues, TrainResult, TrainState, Validation
from tasks.train.step import Window
from tasks.train.validation import evaluate


class Trainer:
    def __init__(self, *, cfg, paths, plan, dist, model, opt, sched, scaler, ema, autocast, norm, feed, val_data,
                 mixup_fn, step, logger, files, callbacks, resume_key: str, preprocessing: dict, run_info: dict,
                 announce: str, tracking: dict, tracker=None, resume: dict | None = None):
        self.cfg, self.paths, self.plan, self.dist = cfg, paths, plan, dist
        self.model, self.opt, self.sched, self.scaler, self.ema = model, opt, sched, scaler, ema
        self.autocast, self.norm, self.feed, self.val_data, self.mixup_fn = autocast, norm, feed, val_data, mixup_fn
        self.step, self.logger, self.files, self.callbacks = step, logger, files, callbacks
        self.tracker = tracker  # the tracking run set-up opened (rank 0), closed by loop.run; part of ``logger``
        self.resume = resume    # the matching last.pt, restored on_fit_start (LastCheckpoint)
        self.resume_key, self.preprocessing, self.run_info, self._announce = (resume_key, preprocessing, run_info,
                                                                               announce)
        self.tracking = tracking  # the tracking run's id and URI, for run_info (rank 0; None without one)
        # the training in flight checkpoints outside models/ (a DVC output, deleted by DVC before the stage runs):
        # a rerun after a crash resumes from there; a finished training publishes both to models/ (_publish)
        ckpts = Path(paths.checkpoints_dir)
        self.last_path, self.best_path = ckpts / "last.pt", ckpts / "best.pt"
        self.state = TrainState()
        self.window = Window()
        self.pending: list[tuple[int, object, float]] = []  # (step, StepOutput, lr): queued, not read back yet
        self.net = model
        self.halted: str | None = None       # why the run failed (non-finite loss)
        self.stop_reason: str | None = None  # an agreed stop ("sigterm", "early_stop")

    # ---------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        status = "FAILED"
        try:
            self.fire("on_fit_start")
            self.rewrap()
            self._log_start()
            for epoch in range(self.state.epoch, self.cfg.epochs):
                if self.state.step >= self.plan.total_steps:
                    break
                self.fire("on_epoch_start", epoch)
                self.net.train()
                self._train_epoch(epoch)
                if self.halted:
                    break
                if self.stop_reason:  # agreed at a read-back: checkpoint mid-epoch, then exit
                    self.state.epoch_loss_sum = float(self.step.loss_sum)  # what the epoch's mean has so far
                    self.state.epoch_micro_batches = self.step.micro_batches
                    self.fire("on_stop", self.stop_reason)
                v = self._validate(epoch)
                self.fire("on_validation_end", v)
                self._print_epoch(v)
                self.fire("on_epoch_end", epoch)
                if self.stop_reason:
                    break
            status = "FAILED" if self.halted else "FINISHED"
        except SystemExit:
            status = "KILLED"
            raise
        finally:
            self.fire("on_fit_end", status)
        return self._finish()

    def _train_epoch(self, epoch: int) -> None:
        self.step.reset_epoch()
        if self.state.next_batch:  # resumed mid-epoch: the train-loss sums of the batches before it (same order)
            self.step.loss_sum.fill_(self.state.epoch_loss_sum)
            self.step.micro_batches = self.state.epoch_micro_batches
        usable, total = self.plan.micro_batches_per_epoch, self.plan.total_steps
        batches = self.feed.batches(self.cfg.batch_size, epoch, self.state.next_batch)
        micro = micro_batches(batches, self.norm, self.mixup_fn, self.cfg.channels_last, self.window,
                              self.dist.world, more=lambda i: i < usable and self.state.step < total)
        while (out := self.step(self.net, micro, self.state.step)) is not None:
            self.state.step += 1
            self.sched.step_update(num_updates=self.state.step)
            self.state.next_batch = out.index + 1
            self.pending.append((self.state.step, out, self.opt.param_groups[-1]["lr"]))
            self.window.compute_done()
            if self.plan.is_log_step(self.state.step, self.cfg.log_every_steps) and self._read_back(epoch):
                break
        if self.pending and not self.halted:  # the epoch's last steps, before validation reads the weights
            self._read_back(epoch)

    def _read_back(self, epoch: int) -> bool:
        """Hand the queued steps' values to the callbacks, in order; True when the epoch must stop."""
        t_sync = time.perf_counter()
        values = torch.stack([torch.stack([o.loss.float(), o.grad_norm.float(),
                                           *([o.skipped.float()] if o.skipped is not None else [])])
                              for _, o, _ in self.pending]).tolist()  # the window's host-device sync point
        # the losses are already the global batch's (all-reduced): every rank sees the same values
        self.fire("on_read_back")
        self.window.busy += time.perf_counter() - t_sync  # waiting for the device to finish the window's steps
        for (step, o, lr), (loss, grad_norm, *skipped) in zip(self.pending, values):
            v = StepValues(step, epoch, loss, grad_norm, lr, bool(skipped[0]) if o.skipped is not None else None)
            for cb in self.callbacks:
                cb.on_step_values(self, v)
                if self.halted:
                    break
            if self.halted:
                break
        self.pending.clear()
        return self.halted is not None or self.stop_reason is not None

    def _validate(self, epoch: int) -> Validation:
        cfg = self.cfg
        val_loss, val_acc, val_acc_plain = evaluate(self.eval_model, self.norm, self.val_data, self.autocast,
                                                    channels_last=cfg.channels_last, tta=cfg.tta)
        train_loss = float(self.step.loss_sum) / max(self.step.micro_batches, 1)
        record = {"train_loss": train_loss, "val_loss": val_loss, "val_accuracy": val_acc}
        if cfg.tta != "none":  # what the test-time views add, on validation
            record["val_accuracy_single_view"] = val_acc_plain
        self.state.history.append({"epoch": epoch, "step": self.state.step, **record})
        self.logger.log_metrics({"epoch_train_loss": train_loss,
                                 **{k: v for k, v in record.items() if k != "train_loss"}}, self.state.step)
        self.state.epoch, self.state.next_batch = epoch + 1, 0
        self.state.epoch_loss_sum, self.state.epoch_micro_batches = 0.0, 0  # the next epoch's, at its start
        return Validation(epoch, train_loss, val_loss, val_acc, val_acc_plain)

    # ---------------------------------------------------------------- what callbacks call
    def fire(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def callback(self, name: str):
        return next(cb for cb in self.callbacks if cb.name == name)

    def halt(self, reason: str, event: str, step: int) -> None:
        self.halted = reason
        self.logger.log_event(event, reason, step)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def rewrap(self) -> None:
        self.net = self.dist.wrap(self.model, find_unused=self.cfg.pretrained != "none", compile_=self.cfg.compile)

    @property
    def eval_model(self) -> torch.nn.Module:
        """Validation and best.pt use the EMA weights when train.ema_decay is set."""
        return self.ema.module if self.ema is not None else self.model

    @staticmethod
    def save(path: Path, blob: dict) -> None:
        checkpoint.save(path, blob)

    def sections(self) -> dict[str, dict]:
        """The callbacks' state as last.pt holds it: ``state`` (STATE_KEYS, with TrainState's) and ``signals``."""
        state, out = {**self.state.state_dict(), **self.state.epoch_sums()}, {}
        for cb in self.callbacks:
            if cb.checkpoint_key == "state":
                state.update(cb.state_dict())
            elif cb.checkpoint_key:
                out[cb.checkpoint_key] = cb.state_dict()
        return {"state": {k: state[k] for k in STATE_KEYS}, **out}

    def load_sections(self, ck: dict) -> None:
        self.state.load_state_dict(ck["state"])
        for cb in self.callbacks:
            if cb.checkpoint_key:
                cb.load_state_dict(ck[cb.checkpoint_key])

    # ---------------------------------------------------------------- start and end
    def _log_start(self) -> None:
        resumed = self.state.resumed_from
        self.run_info["resumed_from_step"] = resumed
        self.run_info.update(self.tracking)
        # a resume continues the same tracking run, whose params are fixed: where it resumed is an event
        self.logger.log_params({k: v for k, v in self.run_info.items() if k != "resumed_from_step"})
        if resumed:
            self.logger.log_event("resumed", f"resumed at step {resumed} from {self.last_path}", resumed)
        if self.dist.master:
            print(self._announce + (f"; resuming at step {resumed}" if resumed else ""), file=sys.stderr)

    def _print_epoch(self, v: Validation) -> None:
        if not self.dist.master:
            return
        tta = self.cfg.tta
        print(f"train: epoch {v.epoch} step {self.state.step}: train loss {v.train_loss:.4f}, val loss "
              f"{v.val_loss:.4f}, val acc {v.val_accuracy:.4f}"
              + (f" ({tta}; single view {v.val_accuracy_single_view:.4f})" if tta != "none" else "")
              + (" (best)" if v.improved else ""), file=sys.stderr)

    def _publish(self) -> None:
        """The finished training's best.pt and last.pt into models/ (atomically), then the in-flight copies go: the
        next run of this stage (``dvc repro -f train``, new params) trains anew instead of resuming a finished run.
        A kill in between leaves both copies: the rerun resumes at the last step and publishes the same files."""
        models = Path(self.paths.models_dir)
        done = [p for p in (self.best_path, self.last_path) if p.exists()]
        for src in done:
            with io.atomic_path(models / src.name) as tmp:
                shutil.copyfile(src, tmp)
        for src in done:
            src.unlink()

    def _finish(self) -> TrainResult:
        s = self.sections()["state"]
        if self.dist.master:
            outputs.write(self.paths, s, self.run_info, self.callback("step_log").rows, self.halted)
            if not self.halted:
                self._publish()
        if self.halted:
            raise TrainError(self.halted)
        return TrainResult(s["best_val_accuracy"], s["best_val_loss"], s["best_epoch"], s["step"], s["epoch"],
                           s["stopped_early"], self.state.resumed_from)
