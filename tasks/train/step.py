"""One optimiser step: its micro-batches (gradient accumulation, DDP ``no_sync``/FSDP reduce-scatter only on the
last), the loss (soft targets under Mixup/CutMix), clipping, the fp16 scaler, and the EMA update. Nothing here
reads a device value on the host: the step's loss and grad norm stay tensors until the loop's read-back."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Window:
    """Host-side timing of the current log window: images seen, time waiting for data, time computing."""
    t: float = 0.0
    imgs: int = 0
    wait: float = 0.0
    busy: float = 0.0
    t_compute: float | None = None  # when the micro-batch in flight started computing

    def __post_init__(self):
        self.t = time.perf_counter()

    def compute_done(self) -> None:
        if self.t_compute is not None:
            self.busy += time.perf_counter() - self.t_compute
            self.t_compute = None

    def reset(self, now: float) -> None:
        self.t, self.imgs, self.wait, self.busy = now, 0, 0.0, 0.0


@dataclass
class StepOutput:
    index: int                # the last micro-batch's index in the epoch
    loss: torch.Tensor        # the effective batch's mean loss over every rank (device scalar)
    grad_norm: torch.Tensor   # before clipping (device scalar)
    # fp16: the GradScaler found inf/NaN gradients and skipped the update (device bool); None without a scaler
    skipped: torch.Tensor | None = None


class TrainStep:
    def __init__(self, model, opt, scaler, autocast, dist, accumulation: int, grad_clip: float | None,
                 label_smoothing: float, soft_target_loss=None, ema=None):
        self.model, self.opt, self.scaler, self.autocast, self.dist = model, opt, scaler, autocast, dist
        self.accumulation, self.grad_clip, self.label_smoothing = accumulation, grad_clip, label_smoothing
        self.soft_target_loss, self.ema = soft_target_loss, ema
        self.reset_epoch()

    def reset_epoch(self) -> None:
        self.loss_sum = torch.zeros((), device=self.dist.device)  # the epoch's train loss, read back at its end
        self.micro_batches = 0

    def __call__(self, net: torch.nn.Module, micro: Iterator, step: int) -> StepOutput | None:
        """Consume ``micro`` up to the last micro-batch of an accumulation, then step; None when it runs out
        first. ``net``: the wrapped module (DDP, compiled; re-wrapped at a phase switch) around ``model``;
        ``step``: the optimiser steps taken so far (the EMA's warm-up counter)."""
        step_loss = torch.zeros((), device=self.dist.device)
        for i, x, target, y in micro:
            final_micro = (i + 1) % self.accumulation == 0
            loss = self._forward_backward(net, x, target, y, final_micro)
            # float order as before the restructuring: the first micro-batch adds 0.0
            step_loss = loss.detach().float() + (step_loss if i % self.accumulation else 0.0)
            self.loss_sum += loss.detach().float()
            self.micro_batches += 1
            if final_micro:
                return self._optimizer_step(i, step_loss, step)
        return None

    def _forward_backward(self, net, x, target, y, final_micro: bool) -> torch.Tensor:
        if self.dist.fsdp:  # reduce-scatter gradients only on the last micro-batch of an accumulation
            net.set_requires_gradient_sync(final_micro)
        skip_sync = self.dist.world > 1 and not final_micro and hasattr(net, "no_sync")
        with net.no_sync() if skip_sync else contextlib.nullcontext():
            with self.autocast():
                logits = net(x)
                if self.soft_target_loss is not None:  # soft targets: cross-entropy against the mixed distribution
                    loss = self.soft_target_loss(logits.float(), target)
                else:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            self.scaler.scale(loss / self.accumulation).backward()
        return loss

    def _optimizer_step(self, i: int, step_loss: torch.Tensor, step: int) -> StepOutput:
        self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        # FSDP: a DTensor; full_tensor() is the norm over every rank's shard
        grad_norm = total_norm.full_tensor() if hasattr(total_norm, "full_tensor") else total_norm
        # the mean over the whole effective batch; the logged loss is the global batch's, as one process's
        loss_value = self.dist.mean(step_loss / self.accumulation)
        scale = self._scale()
        before = scale.clone() if scale is not None else None
        self.scaler.step(self.opt)
        self.scaler.update()  # backs the scale off (in place) exactly when it skipped the step
        skipped = scale < before if scale is not None else None
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return StepOutput(i, loss_value.detach(), grad_norm.detach(), skipped)

    def _scale(self) -> torch.Tensor | None:
        """The fp16 loss scale as the device tensor the scaler updates in place (None when it is off). Read on
        the device, not with ``get_scale()``, which would add a host sync per step."""
        return getattr(self.scaler, "_scale", None) if self.scaler.is_enabled() else None
