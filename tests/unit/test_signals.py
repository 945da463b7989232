"""SignalMonitor on synthetic traces: each signal fires once where expected, re-arms, survives a resume."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from tasks.train.signals import SIGNAL_NAMES, Signal, SignalMonitor


def feed_steps(mon: SignalMonitor, losses, grads=None, start: int = 0) -> list[Signal]:
    grads = [1.0] * len(losses) if grads is None else grads
    out: list[Signal] = []
    for i, (loss, g) in enumerate(zip(losses, grads, strict=True)):
        out += mon.on_step(start + i, loss, g)
    return out


def feed_epochs(mon: SignalMonitor, train, val, metric, steps_per_epoch: int = 100) -> list[Signal]:
    out: list[Signal] = []
    for e, (t, v, m) in enumerate(zip(train, val, metric, strict=True)):
        out += mon.on_epoch(e, (e + 1) * steps_per_epoch, t, v, m)
    return out


def healthy_steps(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = np.arange(n)
    loss = (2.2 * np.exp(-s / 120) + 0.15) * rng.normal(1.0, 0.08, n)   # noisy minibatch losses, falling
    grad = (3.0 * np.exp(-s / 200) + 0.5) * rng.normal(1.0, 0.1, n)
    return loss.tolist(), grad.tolist()


HEALTHY_EPOCHS = {
    "train": [2.0, 1.4, 1.1, 0.9, 0.75, 0.65, 0.58, 0.53, 0.5, 0.48],
    "val": [1.9, 1.45, 1.2, 1.02, 0.93, 0.88, 0.85, 0.83, 0.82, 0.815],
    "metric": [0.35, 0.52, 0.61, 0.68, 0.72, 0.75, 0.77, 0.78, 0.785, 0.79],
}


def test_healthy_run_triggers_nothing():
    mon = SignalMonitor()
    loss, grad = healthy_steps()
    assert feed_steps(mon, loss, grad) == []
    for seed in range(1, 6):
        assert feed_steps(SignalMonitor(), *healthy_steps(seed=seed)) == []
    assert feed_epochs(mon, **HEALTHY_EPOCHS) == []


@pytest.mark.parametrize("seed", range(5))
def test_converged_tiny_noisy_losses_trigger_nothing(seed):
    # a memorised train set: per-batch losses ~0.01 with std ~ mean -- relatively noisy but harmless,
    # neither an oscillation nor (chance 10% moves of the window mean) a rise
    rng = np.random.default_rng(seed)
    loss = np.abs(rng.normal(0.01, 0.01, 400)).tolist()
    assert feed_steps(SignalMonitor(), loss) == []


def test_non_finite_loss_fires_once_and_rearms():
    mon = SignalMonitor(window=5)
    sigs = feed_steps(mon, [1.0, 0.9, float("nan"), float("inf"), 0.8, float("-inf")])
    assert [(s.name, s.step) for s in sigs] == [("non_finite_loss", 2), ("non_finite_loss", 5)]
    assert "nan" in sigs[0].detail and "train.lr" in sigs[0].detail
    assert "-inf" in sigs[1].detail


def test_train_loss_rising_fires_once_and_rearms():
    w = 5
    # a rise inside the warm-up (fewer than 2*window losses) is not judged
    assert feed_steps(SignalMonitor(window=w), [1.0] * 5 + [2.0] * 4) == []
    mon = SignalMonitor(window=w)
    losses = [1.0] * 10 + [2.0] * 10 + [4.0] * 5
    sigs = feed_steps(mon, losses)
    # a clean step is "significant" (> 4 standard errors) once the new window is all 2.0: step 14; clears once
    # the rise is no longer significant; the step to 4.0 fires again at step 24
    assert [(s.name, s.step) for s in sigs] == [("train_loss_rising", 14), ("train_loss_rising", 24)]
    assert "is 2, up from 1 " in sigs[0].detail and "2x > 1.1x" in sigs[0].detail
    assert "is 4, up from 2 " in sigs[1].detail and "train.lr" in sigs[1].detail


def test_train_loss_rising_on_a_noisy_ramp():
    rng = np.random.default_rng(7)
    base = np.r_[np.ones(100), np.linspace(1.0, 2.0, 60), np.full(40, 2.0)]
    sigs = feed_steps(SignalMonitor(), (base * rng.normal(1.0, 0.1, base.size)).tolist())
    assert [s.name for s in sigs] == ["train_loss_rising"]
    assert 100 < sigs[0].step < 160


@pytest.mark.parametrize("seed", range(3))
def test_noisy_plateau_is_not_rising(seed):
    rng = np.random.default_rng(seed)
    assert feed_steps(SignalMonitor(), rng.normal(1.0, 0.15, 1000).tolist()) == []


def test_small_rise_is_noise():
    assert feed_steps(SignalMonitor(window=5), [1.0] * 10 + [1.05] * 10) == []


def test_blow_up_from_a_converged_loss_still_fires():
    sigs = feed_steps(SignalMonitor(window=5), [0.01] * 10 + [0.5] * 5)
    assert [(s.name, s.step) for s in sigs] == [("train_loss_rising", 14)]


def test_train_loss_oscillating():
    w = 10
    mon = SignalMonitor(window=w)
    osc1 = [0.2, 2.0] * 10            # steps 0-19: mean 1.1, std 0.9
    calm = [1.0] * 15                 # steps 20-34
    osc2 = [0.1, 1.9] * 10            # steps 35-54: mean 1.0 -> no rise against the calm window
    sigs = feed_steps(mon, osc1 + calm + osc2)
    names = {s.name for s in sigs}
    assert names == {"train_loss_oscillating"}
    first, second = sigs
    assert first.step == w - 1        # the first full window
    # std from successive differences: sqrt(1.8**2 / 2) / 1.1 = 1.157
    assert "8 of the last 8" in first.detail and "1.157" in first.detail and "train.lr" in first.detail
    assert 35 < second.step < 35 + 2 * w


def test_monotone_fast_drop_is_not_oscillation():
    # a steep but smooth fall has a large relative spread but no direction changes
    loss = (2.3 * np.exp(-np.arange(60) / 5) + 0.05).tolist()
    assert feed_steps(SignalMonitor(window=10), loss) == []


def test_level_jump_in_noisy_loss_is_not_oscillation():
    # a window straddling a jump from noisy ~1.0 to noisy ~3.0 has a large plain std but is no oscillation
    rng = np.random.default_rng(5)
    loss = np.r_[np.ones(60), np.full(30, 3.0)] * rng.normal(1.0, 0.1, 90)
    assert "train_loss_oscillating" not in {s.name for s in feed_steps(SignalMonitor(), loss.tolist())}


def test_grad_norm_exploding_by_growth_fires_once_and_rearms():
    w = 5
    mon = SignalMonitor(window=w)
    grads = [1.0] * 10 + [20.0] * 5 + [1.0] * 5 + [30.0] * 5
    sigs = feed_steps(mon, [1.0] * len(grads), grads)
    # median of the last 5 exceeds 10x once three of them are big: steps 12 and 22
    assert [(s.name, s.step) for s in sigs] == [("grad_norm_exploding", 12), ("grad_norm_exploding", 22)]
    assert "20" in sigs[0].detail and "20x" in sigs[0].detail and "median 1 " in sigs[0].detail
    assert "train.grad_clip" in sigs[0].detail


def test_grad_norm_moderate_growth_is_fine():
    grads = [1.0] * 10 + [5.0] * 20
    assert feed_steps(SignalMonitor(window=5), [1.0] * 30, grads) == []


def test_grad_norm_non_finite_fires_immediately():
    mon = SignalMonitor(window=5)
    sigs = feed_steps(mon, [1.0] * 4, [1.0, float("inf"), float("nan"), 1.0])
    assert [(s.name, s.step) for s in sigs] == [("grad_norm_exploding", 1)]
    assert "inf" in sigs[0].detail


def test_val_diverging_fires_once_and_rearms():
    mon = SignalMonitor()
    train = [2.0, 1.5, 1.2, 1.0, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4]
    val = [2.1, 1.6, 1.4, 1.5, 1.7, 1.9, 1.3, 1.35, 1.4, 1.2]
    metric = [0.3, 0.4, 0.5, 0.52, 0.5, 0.49, 0.55, 0.54, 0.53, 0.56]
    sigs = feed_epochs(mon, train, val, metric)
    # epoch 4: 1.4 -> 1.5 -> 1.7 vs train 1.2 -> 1.0 -> 0.8; still rising at epoch 5 (no repeat);
    # falls at epoch 6 (re-arm); rises twice again by epoch 8
    assert [(s.name, s.step) for s in sigs] == [("val_diverging", 500), ("val_diverging", 900)]
    assert "1.4 -> 1.5 -> 1.7" in sigs[0].detail and "1.2 -> 1 -> 0.8" in sigs[0].detail
    assert "epoch 4" in sigs[0].detail and "early_stopping" in sigs[0].detail


def test_val_diverging_respects_min_epochs_and_needs_falling_train():
    train, val, metric = [2.0, 1.5, 1.2, 1.0, 0.9], [1.0, 1.1, 1.2, 1.3, 1.4], [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [s.step for s in feed_epochs(SignalMonitor(), train, val, metric)] == [300]
    late = SignalMonitor(min_epochs_for_divergence=5)
    assert [s.step for s in feed_epochs(late, train, val, metric)] == [500]
    # train rising too: not over-fitting (that is a rising-loss problem, reported per step)
    assert feed_epochs(SignalMonitor(), [1.0, 1.1, 1.2, 1.3], [1.0, 1.1, 1.2, 1.3], metric[:4]) == []


def test_val_flat():
    mon = SignalMonitor()
    metric = [0.1, 0.1005, 0.1, 0.1, 0.1]
    sigs = feed_epochs(mon, [2.3] * 5, [2.3] * 5, metric)
    assert [(s.name, s.step) for s in sigs] == [("val_flat", 300)]   # after 3 epochs, once
    assert "0.1" in sigs[0].detail and "3 epochs" in sigs[0].detail and "0.001" in sigs[0].detail
    # movement beyond the tolerance clears it
    assert mon.on_epoch(5, 600, 2.0, 2.0, 0.3) == []
    assert "val_flat" not in mon.state_dict()["active"]
    # two flat epochs are not yet a signal
    assert feed_epochs(SignalMonitor(), [2.3] * 2, [2.3] * 2, [0.1, 0.1]) == []


def mixed_trace():
    """Steps and epochs that trigger every signal, several of them active across the middle of the trace."""
    rng = np.random.default_rng(3)
    ev = []
    step = 0
    spe = 60
    val = [2.0, 1.6, 1.5, 1.6, 1.8, 1.5, 1.6, 1.7]
    train = [2.2, 1.8, 1.5, 1.3, 1.1, 1.0, 0.9, 0.8]
    metric = [0.2, 0.2, 0.2, 0.2, 0.4, 0.45, 0.5, 0.5]
    for epoch in range(8):
        for i in range(spe):
            if epoch == 2 and 20 <= i < 45:
                loss = [0.2, 2.5][i % 2]                    # oscillation
            elif epoch == 3 and 10 <= i < 50:
                loss = 3.0 + 0.05 * i                        # rising
            elif epoch == 5 and i == 30:
                loss = float("nan")
            else:
                loss = max(0.3, 2.0 - 0.004 * step) * rng.normal(1.0, 0.05)
            g = 50.0 if (epoch == 4 and i > 10) or (epoch == 6 and i == 7) else rng.normal(1.0, 0.1)
            if epoch == 6 and i == 8:
                g = float("inf")
            skipped = epoch == 7 and 10 <= i < 40               # fp16 scaler skipping 30 steps in a row
            ev.append(("s", step, loss, float("inf") if skipped else g, skipped))
            step += 1
        ev.append(("e", epoch, step, train[epoch], val[epoch], metric[epoch]))
    return ev


def run(mon: SignalMonitor, events) -> list[tuple]:
    out = []
    for e in events:
        sigs = mon.on_step(*e[1:]) if e[0] == "s" else mon.on_epoch(*e[1:])
        out += [(s.name, s.step, s.detail) for s in sigs]
    return out


def test_mixed_trace_triggers_every_signal():
    got = run(SignalMonitor(), mixed_trace())
    assert {n for n, _, _ in got} == set(SIGNAL_NAMES)


@pytest.mark.parametrize("cut", [100, 150, 200, 263, 300, 400, 440])
def test_state_dict_round_trip_is_identical(cut):
    events = mixed_trace()
    expected = run(SignalMonitor(), events)
    first = SignalMonitor()
    got = run(first, events[:cut])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))   # JSON-able, even after a NaN loss
    resumed = SignalMonitor()
    resumed.load_state_dict(state)
    got += run(resumed, events[cut:])
    assert got == expected


def test_state_dict_restores_active_signals():
    # a signal active at checkpoint time must not fire again right after resume
    mon = SignalMonitor(window=5)
    assert [s.step for s in feed_steps(mon, [1.0] * 10, [1.0] * 5 + [50.0] * 5)] == [7]
    state = mon.state_dict()
    assert state["active"] == ["grad_norm_exploding"]
    resumed = SignalMonitor(window=5)
    resumed.load_state_dict(state)
    assert feed_steps(resumed, [1.0] * 3, [50.0] * 3, start=10) == []
    # ... and it is the restored "active" set that keeps it quiet
    forgetful = SignalMonitor(window=5)
    forgetful.load_state_dict({**state, "active": []})
    assert [s.step for s in feed_steps(forgetful, [1.0] * 3, [50.0] * 3, start=10)] == [10]


def test_state_dict_is_strict_json_after_a_nan_epoch():
    mon = SignalMonitor()
    feed_epochs(mon, [2.0, 1.5, float("nan")], [2.0, float("inf"), float("nan")], [0.1, 0.2, float("nan")])
    state = json.loads(json.dumps(mon.state_dict(), allow_nan=False))
    resumed = SignalMonitor()
    resumed.load_state_dict(state)
    assert resumed.on_epoch(3, 400, 1.0, 1.0, 0.3) == mon.on_epoch(3, 400, 1.0, 1.0, 0.3)


def test_load_rejects_unknown_version():
    with pytest.raises(ValueError, match="version"):
        SignalMonitor().load_state_dict({"version": 99})


def test_skipped_fp16_steps_are_not_an_exploding_grad_norm():
    """A step the fp16 GradScaler skipped reports an inf/NaN grad norm by design: not a signal, and it neither
    enters the median windows nor re-arms an active signal."""
    mon = SignalMonitor(window=5)
    grads = [1.0] * 6 + [float("inf"), float("nan")] * 3 + [1.0] * 4
    skipped = [False] * 6 + [True] * 6 + [False] * 4
    sigs = [s for i, (g, sk) in enumerate(zip(grads, skipped)) for s in mon.on_step(i, 1.0, g, skipped=sk)]
    assert sigs == []
    assert mon.state_dict()["grads"] == [1.0] * 5  # only the applied steps' norms
    assert mon.state_dict()["skips"] == 0  # the run of skips ended


def test_many_consecutive_skipped_steps_fire_once_and_rearm():
    mon = SignalMonitor(max_consecutive_skips=4)
    trace = [True] * 3 + [False] + [True] * 6 + [False] + [True] * 4
    sigs = [s for i, sk in enumerate(trace) for s in mon.on_step(i, 1.0, float("inf") if sk else 1.0, skipped=sk)]
    assert [(s.name, s.step) for s in sigs] == [("steps_skipped", 7), ("steps_skipped", 14)]
    assert "4 steps in a row" in sigs[0].detail and "bf16" in sigs[0].detail


def test_skip_count_survives_a_resume_and_old_states_load():
    mon = SignalMonitor(max_consecutive_skips=4)
    for i in range(3):
        mon.on_step(i, 1.0, float("inf"), skipped=True)
    resumed = SignalMonitor(max_consecutive_skips=4)
    resumed.load_state_dict(json.loads(json.dumps(mon.state_dict())))
    assert [s.name for s in resumed.on_step(3, 1.0, float("inf"), skipped=True)] == ["steps_skipped"]
    old = {k: v for k, v in mon.state_dict().items() if k != "skips"}  # a last.pt from before skip counting
    SignalMonitor().load_state_dict(old)


def _tiny_step(scaler):
    import torch

    from tasks.train.step import TrainStep
    from tests.unit.train.fakes import FakeDist

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, TrainStep(model, opt, scaler, contextlib.nullcontext, FakeDist(), accumulation=1, grad_clip=1.0,
                            label_smoothing=0.0)


def test_a_step_the_fp16_scaler_skips_is_counted_not_logged_as_a_grad_norm():
    """An inf gradient under an enabled GradScaler (CPU here, as on CUDA): the update is skipped, the step says
    so, and neither the signal monitor nor the step log see its inf grad norm."""
    import torch

    from tasks.train.callbacks.signal_events import SignalEvents
    from tasks.train.callbacks.step_log import StepLog
    from tasks.train.state import StepValues
    from tests.unit.train.fakes import FakeTrainer

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, step = _tiny_step(scaler)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    out = step(model, iter([(0, x, None, y)]), 0)
    assert out.skipped is not None and not bool(out.skipped)  # a normal step: applied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    out = step(model, iter([(1, x, None, y)]), 1)
    hook.remove()
    assert bool(out.skipped) and not torch.isfinite(out.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the update did not happen
    assert scaler.get_scale() == 2.0**7

    t = FakeTrainer([SignalEvents(), StepLog(log_every=1)])
    for i in range(30):  # an applied step, then a window's worth of skipped ones
        v = StepValues(i, 0, 1.0, float(out.grad_norm) if i else 1.0, 0.01, skipped=i > 0)
        for cb in t.callbacks:
            cb.on_step_values(t, v)
    assert [name for name, _, _ in t.logger.events] == ["steps_skipped"]  # 25 in a row; no grad_norm_exploding
    assert [m.get("grad_norm") for _, m in t.logger.metrics] == [1.0] + [None] * 29
    assert [m["skipped_steps"] for _, m in t.logger.metrics] == [0] + [1] * 29


def test_without_a_scaler_no_step_reports_skipping():
    import torch

    model, step = _tiny_step(torch.amp.GradScaler("cpu", enabled=False))
    out = step(model, iter([(0, torch.randn(8, 4), None, torch.randint(0, 3, (8,)))]), 0)
    assert out.skipped is None
