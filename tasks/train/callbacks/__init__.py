"""The loop's policies as callbacks, and the one list that orders them.

``Trainer.fit`` (tasks/train/trainer.py) is this loop; each ``on_*`` is an event, fired on every callback in
``ORDER``. Events fire only where the loop already holds host values (the read-back once per
``train.log_every_steps``, validation, the epoch's end), so no callback adds a host-device sync, and every
cross-rank decision is one ``trainer.dist.agree(flag)`` (all_reduce MAX) inside those windows::

    (set-up reads a matching last.pt first: the tracking run to open is the one it names)
    on_fit_start                      # LastCheckpoint: resume from last.pt; TransferPhases: the starting phase;
                                      # SigTerm: install the handler (it only sets a flag)
    wrap the model (DDP / compile); log the run's params
    for epoch in range(state.epoch, epochs):
        on_epoch_start(epoch)         # TransferPhases: phase 2 at freeze_backbone_epochs (re-wraps DDP);
                                      # ProgressBar: the epoch's bar (rank 0)
        for each optimiser step (TrainStep: micro-batches, accumulation, clip, scaler, EMA):
            scheduler.step_update; queue the step's device scalars
            every log_every_steps (and at the last step) -> read-back:
        read-back (also at the epoch's end when steps are queued):
            values = .tolist()        # the window's one host-device sync point
            on_read_back              # SigTerm: agree(signal seen) -> trainer.request_stop("sigterm")
            for each step of the window, in order:
                on_step_values(v)     # NonFinite: halt (FAILED) and stop reading; SignalEvents: the step
                                      # detectors; StepLog: the logged row every log_every_steps;
                                      # ProgressBar: one step on the epoch's bar (a terminal only)
            stop the epoch when halted or a stop was requested
        halted -> leave the loop
        stop requested -> on_stop     # LastCheckpoint: mid-epoch last.pt; SigTerm: event, SystemExit(143)
        validate (EMA weights when on); state.epoch += 1
        on_validation_end(v)          # SignalEvents: epoch detectors; BestCheckpoint: improved? best.pt;
                                      # EarlyStopping: patience -> agree(decision) -> request_stop
        on_epoch_end(epoch)           # LastCheckpoint: last.pt
        stop requested -> leave the loop
    on_fit_end(status)                # always (finally): SigTerm restores the previous handler

A callback keeps its own state; ``checkpoint_key`` says where it lives in last.pt (``"state"``: merged into the
legacy ``last.pt["state"]`` dict, whose keys ``tasks.train.state.STATE_KEYS`` pins; ``"signals"``: its own entry;
None: not saved, derived again on a resume).
"""
from __future__ import annotations


class Callback:
    checkpoint_key: str | None = None

    def on_fit_start(self, t) -> None: ...
    def on_epoch_start(self, t, epoch: int) -> None: ...
    def on_read_back(self, t) -> None: ...
    def on_step_values(self, t, v) -> None: ...
    def on_stop(self, t, reason: str) -> None: ...
    def on_validation_end(self, t, v) -> None: ...
    def on_epoch_end(self, t, epoch: int) -> None: ...
    def on_fit_end(self, t, status: str) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


# The order callbacks fire in, for every event (tests/unit/train pins it). Why this order: the resume must come
# first (it sets the epoch the phase is derived from); NonFinite before the step consumers (a halted step is not
# logged); BestCheckpoint before EarlyStopping (it decides "improved"); LastCheckpoint saves on_epoch_end, after
# EarlyStopping's decision is in the state, and on_stop before SigTerm exits; ProgressBar last: a halted step
# does not move the bar, and it is closed before anything prints the epoch's line.
ORDER = ("last_checkpoint", "transfer_phases", "sigterm", "non_finite", "signal_events", "step_log",
         "best_checkpoint", "early_stopping", "sweep_pruning", "progress_bar")


def default_callbacks(cfg) -> list[Callback]:
    """One instance of each, in ``ORDER``; ``sweep_pruning`` only in a ``keel sweep`` trial (KEEL_SWEEP_TRIAL)."""
    from tasks.train.callbacks.best_checkpoint import BestCheckpoint
    from tasks.train.callbacks.early_stopping import EarlyStopping
    from tasks.train.callbacks.last_checkpoint import LastCheckpoint
    from tasks.train.callbacks.non_finite import NonFinite
    from tasks.train.callbacks.progress_bar import ProgressBar
    from tasks.train.callbacks.signal_events import SignalEvents
    from tasks.train.callbacks.sigterm import SigTerm
    from tasks.train.callbacks.step_log import StepLog
    from tasks.train.callbacks.sweep_pruning import SweepPruning
    from tasks.train.callbacks.transfer_phases import TransferPhases

    made = {"last_checkpoint": LastCheckpoint(), "transfer_phases": TransferPhases(cfg), "sigterm": SigTerm(),
            "non_finite": NonFinite(), "signal_events": SignalEvents(), "step_log": StepLog(cfg.log_every_steps),
            "best_checkpoint": BestCheckpoint(cfg.monitor), "early_stopping": EarlyStopping(cfg.monitor,
                                                                                             cfg.early_stopping_patience),
            "sweep_pruning": SweepPruning.from_env(), "progress_bar": ProgressBar()}
    return [made[name] for name in ORDER if made[name] is not None]
