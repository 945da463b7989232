"""Each callback against a fake trainer (no training): the decisions, the checkpointed state, the order."""
from __future__ import annotations

import math
import signal
from types import SimpleNamespace

import pytest

from tasks.core.config import TrainConfig
from tasks.train.callbacks import ORDER, default_callbacks
from tasks.train.callbacks.best_checkpoint import BestCheckpoint
from tasks.train.callbacks.early_stopping import EarlyStopping
from tasks.train.callbacks.non_finite import NonFinite
from tasks.train.callbacks.progress_bar import ProgressBar
from tasks.train.callbacks.signal_events import SignalEvents
from tasks.train.callbacks.sigterm import SigTerm
from tasks.train.callbacks.step_log import StepLog
from tasks.train.callbacks.transfer_phases import TransferPhases
from tasks.train.state import FRESH, STATE_KEYS, StepValues, TrainState
from tasks.train.trainer import Trainer
from tests.unit.train.fakes import FakeDist, FakeTrainer


def test_the_callback_order_is_pinned():
    assert ORDER == ("last_checkpoint", "transfer_phases", "sigterm", "non_finite", "signal_events", "step_log",
                     "best_checkpoint", "early_stopping", "sweep_pruning", "progress_bar")
    # sweep_pruning is there only in a keel sweep trial (KEEL_SWEEP_TRIAL)
    assert [cb.name for cb in default_callbacks(TrainConfig())] == [n for n in ORDER if n != "sweep_pruning"]


def test_last_pt_state_keeps_its_keys_and_fresh_values():
    """last.pt["state"] is the resume format of runs already in flight: the same keys, the same fresh values."""
    t = FakeTrainer(default_callbacks(TrainConfig()))
    sections = Trainer.sections(t)
    assert tuple(sections["state"]) == STATE_KEYS
    assert sections["state"] == FRESH
    assert set(sections) == {"state", "signals"}


@pytest.mark.parametrize(("monitor", "trace", "best_epoch"), [
    ("val_loss", [(1.0, 0.1), (0.8, 0.1), (0.9, 0.9), (0.85, 0.9)], 1),       # lower loss wins; accuracy ignored
    ("val_accuracy", [(1.0, 0.5), (2.0, 0.7), (0.1, 0.6), (0.1, 0.7)], 1),    # higher accuracy wins; a tie does not
])
def test_best_checkpoint_follows_the_monitor(tmp_path, monitor, trace, best_epoch):
    best = BestCheckpoint(monitor)
    t = FakeTrainer([best], tmp=tmp_path)
    improved = [t.validate(e, loss, acc).improved for e, (loss, acc) in enumerate(trace)]
    assert improved == [True, True, False, False]
    assert best.best_epoch == best_epoch and t.saved[t.best_path]["epoch"] == best_epoch
    assert (best.best_val_loss, best.best_val_accuracy) == trace[best_epoch]
    assert t.saved[t.best_path]["val_loss"] == trace[best_epoch][0]


@pytest.mark.parametrize(("monitor", "trace"), [
    ("val_loss", [(1.0, 0), (0.9, 0), (0.95, 0), (0.91, 0), (0.5, 0)]),
    ("val_accuracy", [(0, 0.5), (0, 0.6), (0, 0.6), (0, 0.55), (0, 0.9)]),
])
def test_early_stopping_after_patience_epochs_without_improvement(tmp_path, monitor, trace):
    es = EarlyStopping(monitor, patience=2)
    t = FakeTrainer([BestCheckpoint(monitor), es], tmp=tmp_path)
    stopped_at = None
    for e, (loss, acc) in enumerate(trace):
        t.validate(e, loss, acc)
        if t.stop_reason:
            stopped_at = e
            break
    assert stopped_at == 3 and es.stopped_early and t.stop_reason == "early_stop"
    assert t.logger.events == [("early_stop", f"no improvement of {monitor} for 2 epochs; best epoch 1", 0)]
    assert es.evaluate(best_epoch=1) == (True, f"no improvement of {monitor} for 2 epochs; best epoch 1")


def test_early_stopping_off_and_an_improvement_resets_patience():
    es = EarlyStopping("val_loss", patience=None)
    for _ in range(10):
        es.update(improved=False)
    assert es.evaluate(0) == (False, None)
    es = EarlyStopping("val_loss", patience=3)
    for improved in (False, False, True, False, False):
        es.update(improved)
    assert es.bad_epochs == 2 and es.evaluate(0) == (False, None)


def test_early_stopping_decision_is_agreed_across_ranks(tmp_path):
    """A rank whose own patience is not exhausted stops too when another rank's is (agree = MAX)."""
    es = EarlyStopping("val_loss", patience=5)
    t = FakeTrainer([BestCheckpoint("val_loss"), es], dist=FakeDist(world=2, agree=lambda flag: True), tmp=tmp_path)
    t.validate(0, 1.0, 0.0)
    assert t.dist.agreed == [False] and es.stopped_early and t.stop_reason == "early_stop"


def test_sigterm_on_one_rank_stops_every_rank():
    ranks = [SigTerm(), SigTerm()]
    # the fake all_reduce(MAX): any rank's flag
    dist = [FakeDist(world=2, master=r == 0, agree=lambda flag: any(s.signum is not None for s in ranks))
            for r in range(2)]
    trainers = [FakeTrainer([cb], dist=d) for cb, d in zip(ranks, dist)]
    for t in trainers:
        t.callbacks[0].on_read_back(t)
    assert [t.stop_reason for t in trainers] == [None, None]
    ranks[1]._handler(signal.SIGTERM, None)  # only rank 1 got the signal
    for t in trainers:
        t.callbacks[0].on_read_back(t)
    assert [t.stop_reason for t in trainers] == ["sigterm", "sigterm"]
    assert dist[0].agreed[-1] is False and dist[1].agreed[-1] is True
    with pytest.raises(SystemExit) as e:
        ranks[0].on_stop(trainers[0], "sigterm")
    assert e.value.code == 128 + signal.SIGTERM
    assert trainers[0].logger.events[0][0] == "sigterm"


def test_sigterm_handler_is_installed_for_the_fit_and_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    cb, t = SigTerm(), FakeTrainer()
    cb.on_fit_start(t)
    assert signal.getsignal(signal.SIGTERM) == cb._handler
    cb.on_fit_end(t, "KILLED")
    assert signal.getsignal(signal.SIGTERM) == before


def test_non_finite_loss_halts_naming_the_step_and_the_last_checkpoint():
    cb, t = NonFinite(), FakeTrainer()
    cb.on_step_values(t, StepValues(6, 1, 2.5, 1.0, 0.1))
    assert t.halted is None
    cb.on_step_values(t, StepValues(7, 2, math.nan, 1.0, 0.1))
    assert t.halted.startswith("non-finite loss (nan) at step 7, epoch 2; the last good checkpoint is ")
    assert str(t.last_path) in t.halted
    assert t.logger.events == [("non_finite_loss", t.halted, 7)]


def _transfer_cfg(**kw):
    return SimpleNamespace(pretrained="checkpoint", freeze_backbone_epochs=2, unfreeze_top_blocks=1,
                           backbone_lr_factor=0.1, **kw)


def test_transfer_phases_switch_at_freeze_backbone_epochs(monkeypatch):
    calls = []
    monkeypatch.setattr("tasks.model.build.set_phase", lambda model, phase, top: calls.append((phase, top)))
    cb = TransferPhases(_transfer_cfg())
    t = FakeTrainer([cb], dist=FakeDist(world=2))
    cb.on_fit_start(t)
    assert cb.phase == 1 and calls == [(1, 1)]
    cb.on_epoch_start(t, 1)
    assert cb.phase == 1 and calls == [(1, 1)] and not t.logger.events
    cb.on_epoch_start(t, 2)
    assert cb.phase == 2 and calls == [(1, 1), (2, 1)] and t.rewraps == 1
    assert t.logger.events[0][0] == "phase_2"
    cb.on_epoch_start(t, 3)  # once
    assert len(calls) == 2 and t.rewraps == 1


def test_transfer_phases_resume_lands_in_phase_two_and_off_without_transfer(monkeypatch):
    calls = []
    monkeypatch.setattr("tasks.model.build.set_phase", lambda model, phase, top: calls.append(phase))
    cb, t = TransferPhases(_transfer_cfg()), FakeTrainer()
    t.state.epoch = 2  # resumed after the switch
    cb.on_fit_start(t)
    assert cb.phase == 2 and calls == [2]
    off = TransferPhases(SimpleNamespace(pretrained="none", freeze_backbone_epochs=2, unfreeze_top_blocks=0,
                                         backbone_lr_factor=1.0))
    off.on_fit_start(FakeTrainer())
    off.on_epoch_start(FakeTrainer(), 5)
    assert off.phase == 2 and calls == [2]


def test_step_log_writes_a_row_only_on_log_steps():
    cb, t = StepLog(log_every=5), FakeTrainer()
    for s in range(1, 12):
        cb.on_step_values(t, StepValues(s, 0, 1.0 / s, 2.0, 0.01))
    assert [r["step"] for r in cb.rows] == [5, 10]
    assert [s for s, _ in t.logger.metrics] == [5, 10]
    assert {"train_loss", "lr", "grad_norm", "images_per_s", "data_wait_fraction"} <= cb.rows[0].keys()


def test_signal_events_forward_the_monitor_and_round_trip():
    cb, t = SignalEvents(), FakeTrainer()
    cb.on_step_values(t, StepValues(1, 0, 1.0, float("inf"), 0.1))  # a non-finite grad norm fires at once
    assert t.logger.events and t.logger.events[0][0] == "grad_norm_exploding"
    again = SignalEvents()
    again.load_state_dict(cb.state_dict())
    assert again.state_dict() == cb.state_dict()


@pytest.mark.parametrize("make", [
    lambda: BestCheckpoint("val_loss"), lambda: EarlyStopping("val_loss", 3),
    lambda: TransferPhases(_transfer_cfg()), SignalEvents,
])
def test_state_dicts_round_trip(tmp_path, make):
    cb = make()
    if isinstance(cb, BestCheckpoint | EarlyStopping):
        t = FakeTrainer([BestCheckpoint("val_loss"), cb] if isinstance(cb, EarlyStopping) else [cb], tmp=tmp_path)
        for e, loss in enumerate([1.0, 0.5, 0.7]):
            t.validate(e, loss, 0.3)
    elif isinstance(cb, TransferPhases):
        cb.phase = 1
    else:
        for s in range(30):
            cb.on_step_values(FakeTrainer(), StepValues(s, 0, 1.0 + s % 3, 1.0, 0.1))
    saved = cb.state_dict()
    fresh = make()
    assert fresh.state_dict() != saved  # the test can fail: there is state to carry
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved


def test_train_state_round_trips():
    s = TrainState(step=12, epoch=1, next_batch=4, history=[{"epoch": 0}])
    other = TrainState()
    other.load_state_dict(s.state_dict())
    assert other.state_dict() == s.state_dict() == {"step": 12, "epoch": 1, "next_batch": 4, "history": [{"epoch": 0}]}


def _bar_trainer(cb, dist=None):
    return FakeTrainer([cb], dist=dist, cfg=SimpleNamespace(model="tiny", log_every_steps=4))  # 10 steps an epoch


def _epoch_of_steps(t, cb, epoch=0, steps=range(1, 11)):
    cb.on_epoch_start(t, epoch)
    for s in steps:
        cb.on_step_values(t, StepValues(s, epoch, 1.0 / s, 2.0, 0.01))


def test_progress_bar_draws_the_epochs_steps_rate_and_loss_when_forced(monkeypatch, capsys):
    monkeypatch.setenv("KEEL_PROGRESS", "1")  # pytest's stderr is no terminal: force the bar
    cb = ProgressBar()
    t = _bar_trainer(cb)
    _epoch_of_steps(t, cb, steps=range(1, 4))
    assert cb.bar.n == 0  # the window's steps arrive together: the bar moves at its last one
    cb.on_step_values(t, StepValues(4, 0, 0.25, 2.0, 0.01))
    assert cb.bar.n == 4
    for s in range(5, 11):
        cb.on_step_values(t, StepValues(s, 0, 1.0 / s, 2.0, 0.01))
    assert cb.bar is None  # closed at the epoch's last step, before validation prints
    err = capsys.readouterr().err
    assert "train: epoch 0" in err and "10/10" in err and "step/s" in err and "loss=0.1000" in err


def test_progress_bar_resumed_mid_epoch_starts_part_way(monkeypatch, capsys):
    monkeypatch.setenv("KEEL_PROGRESS", "1")
    cb = ProgressBar()
    t = _bar_trainer(cb)
    t.state.step, t.state.next_batch = 4, 4
    _epoch_of_steps(t, cb, steps=[5])
    assert (cb.bar.n, cb.bar.total, cb.pending) == (4, 10, 1)
    cb.on_stop(t, "sigterm")
    assert cb.bar is None and "5/10" in capsys.readouterr().err


@pytest.mark.parametrize(("env", "master"), [({}, True), ({"CI": "1"}, True), ({"KEEL_PROGRESS": "1"}, False)])
def test_progress_bar_draws_nothing_in_a_log_in_ci_or_off_rank_0(monkeypatch, capsys, env, master):
    for k in ("CI", "KEEL_PROGRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cb = ProgressBar()
    t = _bar_trainer(cb, dist=FakeDist(world=2, master=master))
    _epoch_of_steps(t, cb)
    cb.on_fit_end(t, "FINISHED")
    assert capsys.readouterr().err == ""


def _study(tmp_path, trials_done: list[list[float]]):
    """A real Optuna SQLite study with finished trials (their per-epoch val accuracies) and one running trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for curve in trials_done:
        t = study.ask()
        for epoch, value in enumerate(curve):
            t.report(value, epoch)
        study.tell(t, curve[-1])
    running = study.ask()
    return study, {"storage": storage, "study": "s", "trial_id": running._trial_id, "intermediate": "val_accuracy",
                   "startup_trials": 2, "warmup_epochs": 1}, running


def test_sweep_pruning_stops_a_trial_below_the_median_after_warmup(tmp_path, monkeypatch, capsys):
    import json

    from tasks.train.callbacks.sweep_pruning import ENV, SweepPruning

    study, spec, running = _study(tmp_path, [[0.5, 0.8, 0.9], [0.6, 0.85, 0.92]])
    monkeypatch.setenv(ENV, json.dumps(spec))
    cb = SweepPruning.from_env()
    t = FakeTrainer([cb])
    cb.on_fit_start(t)
    t.validate(0, 1.0, 0.1)          # far below, but epoch 0 is warm-up: not pruned
    assert t.stop_reason is None
    t.validate(1, 1.0, 0.2)          # below the median (0.825) of the finished trials at epoch 1: pruned
    assert t.stop_reason == "pruned" and cb.pruned_at == 1
    assert t.logger.events[0][0] == "pruned" and "after epoch 1" in t.logger.events[0][1]
    assert "keel train: pruned by the sweep after epoch 1" in capsys.readouterr().err
    frozen = study.trials[running.number]
    assert frozen.intermediate_values == {0: 0.1, 1: 0.2} and frozen.user_attrs["pruned_at_epoch"] == 1


def test_sweep_pruning_keeps_a_good_trial_and_is_absent_outside_a_sweep(tmp_path, monkeypatch):
    import json

    from tasks.train.callbacks.sweep_pruning import ENV, SweepPruning

    monkeypatch.delenv(ENV, raising=False)
    assert SweepPruning.from_env() is None
    _, spec, _ = _study(tmp_path, [[0.5, 0.8], [0.6, 0.85]])
    monkeypatch.setenv(ENV, json.dumps(spec))
    cb = SweepPruning.from_env()
    t = FakeTrainer([cb])
    cb.on_fit_start(t)
    for epoch, acc in enumerate((0.7, 0.9)):
        t.validate(epoch, 1.0, acc)
    assert t.stop_reason is None and cb.pruned_at is None and t.dist.agreed == [False, False]
    assert [n for n in ORDER if n == "sweep_pruning"] and "sweep_pruning" in [
        c.name for c in default_callbacks(TrainConfig())]
