"""Detectors for the training "intervention signals" a careful practitioner watches for.

The loop feeds plain floats to a ``SignalMonitor`` (``on_step`` after every optimiser step, ``on_epoch``
after every validation) and forwards what comes back to ``MetricLogger.log_event(sig.name, sig.detail,
sig.step)``. Nothing here imports torch, so the detectors are cheap and testable on synthetic traces.

Every signal is edge-triggered: it fires once when its condition becomes true, stays silent while the
condition holds, and re-arms once the condition clears (so a recovered and then relapsing run is reported
again).

Why the thresholds are what they are:

* ``window`` (20 steps): per-batch losses are noisy; 20 batches is enough for a mean/median to be stable,
  yet short enough that a blow-up is reported within a few seconds of training, not an epoch later.
* ``train_loss_rising`` needs 2 x ``window`` finite losses (two full windows to compare) and a rise of more
  than 10% of the previous window's mean. Minibatch noise moves a 20-batch mean by a few percent; a
  sustained 10% rise of the *mean* means the optimiser is climbing out of the basin (LR too high, warm-up
  too short, bad batch order). The rise must also exceed 4 standard errors of the difference of the two
  means: with 10-20% batch-to-batch noise a 10% move of a 20-batch mean is chance, and the test runs on
  every step over heavily overlapping windows with variances estimated from 20 samples, so the nominal tail
  is far too optimistic. On a flat plateau with 10-20% noise, 3 sigma gave ~1 false alarm per 1,500-3,000
  steps, 4 sigma ~1 per 10,000 (5 sigma: none, but it missed a 2x ramp over 60 steps at 20% noise); 4 sigma
  still reports such a ramp ~20-30 steps after it starts.
* ``train_loss_oscillating`` needs both a direction change on at least half of the steps in the window AND a
  relative spread (std/mean) above 0.5. Direction changes alone are normal: i.i.d. batch noise flips
  direction on ~2/3 of the steps. What a too-high LR adds is amplitude -- the loss bouncing between
  "fitting" and "blown out" values, so the std becomes comparable to the mean. A healthy run's batch loss
  has std/mean of ~0.05-0.3. The std is estimated from successive differences, sqrt(mean(diff^2) / 2): for
  bouncing values it equals the plain std, but a steep smooth fall early in training or a level jump inside
  the window (which the plain std would count as spread) contributes almost nothing, so those are not
  reported as oscillation. Both loss detectors ignore windows whose (latest) mean is below ``MIN_MEAN_LOSS``
  (0.05): a nearly memorised training set has tiny per-batch losses whose *relative* spread and moves are
  large but harmless. A real blow-up from there (0.01 -> 0.5) still fires, because it is the new window's
  mean that is tested.
* ``grad_norm_exploding`` compares medians (robust to the occasional spiky batch) of the latest window
  against the first window of the run. The first window is the natural scale of this model/loss/init; a
  sustained ``grad_growth`` (10x) rise above it is an order of magnitude, far beyond what a decaying LR
  schedule or unfreezing a backbone produces, and is the classic precursor of a NaN. A single non-finite
  norm fires at once. Steps the fp16 ``GradScaler`` skipped (``skipped=True``) are not judged: their inf/NaN
  norm is the overflow the scaler exists to absorb, and the update never happened.
* ``steps_skipped``: ``max_consecutive_skips`` (25) skipped fp16 steps in a row. A scaler skips a few steps at
  the start while it backs its scale off from 2^16 (one halving per skip) and one now and then when it tries
  to grow again; 25 in a row means the scale fell below 2^-9 and the gradients still overflow, i.e. they are
  inf/NaN at any scale (a bad batch, a broken loss, an LR that blew the weights up) and nothing is learning.
* ``val_diverging`` needs at least ``min_epochs_for_divergence`` (3) ``on_epoch`` calls (counted, so 0-
  and 1-based epoch numbers behave the same) -- the first epochs' val loss is dominated by warm-up and BN
  statistics settling -- and two consecutive val-loss rises while the train loss fell on both: one rise is
  noise; two, against a falling train loss, is the start of over-fitting.
* ``val_flat`` fires when, after 3 epochs, the val metric's whole range since the first epoch (max - min)
  is within ``flat_tolerance`` (1e-3, i.e. 0.1 accuracy points); once it has moved it cannot fire again.
  Any model that learns moves accuracy by far more than that in 3 epochs; a metric frozen to the third
  decimal means constant predictions, frozen weights or a label/data-pipeline bug.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import median

import numpy as np

__all__ = ["SIGNAL_NAMES", "Signal", "SignalMonitor"]

SIGNAL_NAMES = (
    "non_finite_loss",
    "train_loss_rising",
    "train_loss_oscillating",
    "grad_norm_exploding",
    "steps_skipped",
    "val_diverging",
    "val_flat",
)

_STATE_VERSION = 1


@dataclass
class Signal:
    name: str    # stable code, one of SIGNAL_NAMES
    detail: str  # one readable sentence: the numbers that triggered it and what to do
    step: int


def _json_float(x: float) -> float | None:
    """Strict JSON has no NaN/inf; non-finite epoch losses are stored as null."""
    return float(x) if math.isfinite(x) else None


def _from_json(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _g(x: float) -> str:
    """Compact number formatting for the detail sentences."""
    return f"{x:.4g}"


class SignalMonitor:
    """Edge-triggered detectors over the step and epoch traces (thresholds: see the module docstring)."""

    RISE_RATIO = 1.1                  # mean of the last window vs the previous one
    RISE_MIN_SIGMAS = 4.0             # ... and the rise must exceed this many standard errors
    OSCILLATION_TURN_FRACTION = 0.5   # direction changes / possible direction changes in the window
    OSCILLATION_REL_SPREAD = 0.5      # std / mean of the window's losses
    MIN_MEAN_LOSS = 0.05              # windows with a lower (latest) mean are not judged on relative change
    FLAT_AFTER_EPOCHS = 3

    def __init__(self, *, window: int = 20, min_epochs_for_divergence: int = 3, flat_tolerance: float = 1e-3,
                 grad_growth: float = 10.0, max_consecutive_skips: int = 25):
        if window < 3:
            raise ValueError(f"window must be >= 3 (direction changes need 3 points), got {window}")
        if grad_growth <= 1:
            raise ValueError(f"grad_growth must be > 1, got {grad_growth}")
        if flat_tolerance < 0:
            raise ValueError(f"flat_tolerance must be >= 0, got {flat_tolerance}")
        self.window = int(window)
        self.min_epochs_for_divergence = int(min_epochs_for_divergence)
        self.flat_tolerance = float(flat_tolerance)
        self.grad_growth = float(grad_growth)
        self.max_consecutive_skips = max(1, int(max_consecutive_skips))
        self._reset()

    def _reset(self) -> None:
        self._losses: deque[float] = deque(maxlen=2 * self.window)  # finite step losses, newest last
        self._grad_first: list[float] = []                           # baseline: first `window` finite norms
        self._grads: deque[float] = deque(maxlen=self.window)        # latest finite norms
        self._epochs: deque[tuple[float, float]] = deque(maxlen=3)   # last (train_loss, val_loss) pairs
        self._n_epochs = 0
        self._metric_first: float | None = None
        self._metric_min: float | None = None
        self._metric_max: float | None = None
        self._active: set[str] = set()
        self._skips = 0                                              # skipped fp16 steps in a row, up to now

    # -- edge triggering -----------------------------------------------------------------------------------
    def _edge(self, name: str, condition: bool, step: int, detail, out: list[Signal]) -> None:
        """Append a Signal when `condition` turns true; re-arm when it is false. `detail` is a thunk."""
        if condition:
            if name not in self._active:
                self._active.add(name)
                out.append(Signal(name, detail(), int(step)))
        else:
            self._active.discard(name)

    # -- per step ------------------------------------------------------------------------------------------
    def on_step(self, step: int, loss: float, grad_norm: float, skipped: bool = False) -> list[Signal]:
        """``skipped``: the fp16 GradScaler skipped this update; its grad norm is then not judged."""
        out: list[Signal] = []
        loss = float(loss)
        grad_norm = float(grad_norm)
        w = self.window

        loss_ok = math.isfinite(loss)
        self._edge("non_finite_loss", not loss_ok, step,
                   lambda: f"training loss is {loss} at step {step}; the run halts -- lower train.lr, keep "
                           f"train.grad_clip on, and check the last batch for NaN/inf inputs", out)
        if loss_ok:
            self._losses.append(loss)
            # rising: two full windows of finite losses
            if len(self._losses) == 2 * w:
                arr = np.asarray(self._losses, dtype=np.float64)
                prev, cur = float(arr[:w].mean()), float(arr[w:].mean())
                stderr = math.sqrt((float(arr[:w].var(ddof=1)) + float(arr[w:].var(ddof=1))) / w)
                rising = (cur >= self.MIN_MEAN_LOSS and cur - prev > (self.RISE_RATIO - 1.0) * abs(prev)
                          and cur - prev > self.RISE_MIN_SIGMAS * stderr)
                self._edge("train_loss_rising", rising, step,
                           lambda: f"mean train loss of the last {w} steps is {_g(cur)}, up from {_g(prev)} "
                                   f"in the {w} steps before"
                                   + (f" ({_g(cur / prev)}x > {self.RISE_RATIO}x)" if prev > 0 else "")
                                   + " -- lower train.lr or lengthen train.warmup_steps", out)
            # oscillating: one full window
            if len(self._losses) >= w:
                last = np.asarray(list(self._losses)[-w:], dtype=np.float64)
                signs = np.sign(np.diff(last))
                signs = signs[signs != 0]
                turns = int(np.count_nonzero(signs[1:] != signs[:-1])) if signs.size > 1 else 0
                turn_frac = turns / (w - 2)
                mean = float(last.mean())
                # std from successive differences (sqrt(mean(diff^2)/2)): equals the std for bouncing values,
                # but is blind to a trend or a level shift inside the window
                jitter = math.sqrt(float(np.mean(np.diff(last) ** 2)) / 2.0)
                spread = jitter / mean if mean > 0 else 0.0
                osc = (mean >= self.MIN_MEAN_LOSS and turn_frac >= self.OSCILLATION_TURN_FRACTION
                       and spread > self.OSCILLATION_REL_SPREAD)
                self._edge("train_loss_oscillating", osc, step,
                           lambda: f"train loss changed direction on {turns} of the last {w - 2} steps with "
                                   f"std/mean {_g(spread)} (> {self.OSCILLATION_REL_SPREAD}, "
                                   f"mean {_g(mean)}) -- the LR is likely too high: lower train.lr", out)

        self._skips = self._skips + 1 if skipped else 0
        self._edge("steps_skipped", self._skips >= self.max_consecutive_skips, step,
                   lambda: f"the fp16 loss scaler skipped the last {self._skips} steps in a row (inf/NaN gradients at "
                           f"every scale) -- nothing is being learned: check the data and loss for NaN/inf, lower "
                           f"train.lr, or train in bf16/fp32", out)
        if skipped:  # the overflow the scaler absorbed, not the model's gradient scale
            return out

        # gradient norm
        if math.isfinite(grad_norm):
            if len(self._grad_first) < w:
                self._grad_first.append(grad_norm)
            self._grads.append(grad_norm)
            exploding, why = False, ""
            if len(self._grad_first) == w and len(self._grads) == w:
                base, cur_med = median(self._grad_first), median(self._grads)
                if base > 0 and cur_med > self.grad_growth * base:
                    exploding = True
                    why = (f"median grad norm of the last {w} steps is {_g(cur_med)}, "
                           f"{_g(cur_med / base)}x the first-window median {_g(base)} "
                           f"(> {_g(self.grad_growth)}x)")
        else:
            exploding, why = True, f"grad norm is {grad_norm} at step {step}"
        self._edge("grad_norm_exploding", exploding, step,
                   lambda: f"{why} -- lower train.lr, set/lower train.grad_clip, or lengthen "
                           f"train.warmup_steps", out)
        return out

    # -- per epoch -----------------------------------------------------------------------------------------
    def on_epoch(self, epoch: int, step: int, train_loss: float, val_loss: float,
                 val_metric: float) -> list[Signal]:
        out: list[Signal] = []
        train_loss, val_loss, val_metric = float(train_loss), float(val_loss), float(val_metric)
        self._n_epochs += 1
        self._epochs.append((train_loss, val_loss))

        # diverging: two consecutive val rises while train fell on both (NaN compares False -> no signal)
        hist = list(self._epochs)
        div = False
        if self._n_epochs >= max(3, self.min_epochs_for_divergence) and len(hist) == 3:
            (t0, v0), (t1, v1), (t2, v2) = hist
            div = v0 < v1 < v2 and t0 > t1 > t2
        self._edge("val_diverging", div, step,
                   lambda: f"val loss rose for 2 epochs ({_g(hist[0][1])} -> {_g(hist[1][1])} -> "
                           f"{_g(hist[2][1])}) while train loss fell ({_g(hist[0][0])} -> {_g(hist[1][0])} "
                           f"-> {_g(hist[2][0])}) at epoch {epoch} -- the model is over-fitting: add "
                           f"regularisation (train.weight_decay, train.drop_rate, augmentation) or set "
                           f"train.early_stopping_patience", out)

        # flat: the metric's whole range since the first epoch stays within the tolerance
        if math.isfinite(val_metric):
            if self._metric_first is None:
                self._metric_first = self._metric_min = self._metric_max = val_metric
            else:
                self._metric_min = min(self._metric_min, val_metric)
                self._metric_max = max(self._metric_max, val_metric)
        flat = (self._n_epochs >= self.FLAT_AFTER_EPOCHS and self._metric_first is not None
                and self._metric_max - self._metric_min <= self.flat_tolerance)
        first = self._metric_first
        self._edge("val_flat", flat, step,
                   lambda: f"val metric has stayed at {_g(first)} (within {_g(self.flat_tolerance)}) for "
                           f"{self._n_epochs} epochs up to epoch {epoch} -- the model is not learning: check "
                           f"that labels match images and the params are not frozen, or raise train.lr", out)
        return out

    # -- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "window": self.window,
            "losses": [float(x) for x in self._losses],
            "grad_first": [float(x) for x in self._grad_first],
            "grads": [float(x) for x in self._grads],
            "epochs": [[_json_float(t), _json_float(v)] for t, v in self._epochs],  # NaN -> null
            "n_epochs": self._n_epochs,
            "metric_first": self._metric_first,
            "metric_min": self._metric_min,
            "metric_max": self._metric_max,
            "active": sorted(self._active),
            "skips": self._skips,
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a saved state. The monitor's own thresholds apply; if `window` changed between the runs the
        saved traces are truncated to the new window (the latest values are kept)."""
        if d.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported SignalMonitor state version {d.get('version')!r}")
        self._reset()
        self._losses.extend(float(x) for x in d["losses"])
        self._grad_first = [float(x) for x in d["grad_first"]][: self.window]
        self._grads.extend(float(x) for x in d["grads"])
        self._epochs.extend((_from_json(t), _from_json(v)) for t, v in d["epochs"])
        self._n_epochs = int(d["n_epochs"])
        for k in ("metric_first", "metric_min", "metric_max"):
            setattr(self, f"_{k}", None if d[k] is None else float(d[k]))
        self._active = {n for n in d["active"] if n in SIGNAL_NAMES}
        self._skips = int(d.get("skips", 0))  # absent in a last.pt written before skipped steps were counted
