"""The "largest batch that fits" probe (GPU): doubling, then bisection, on CUDA out-of-memory errors."""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist


class ProbeError(RuntimeError):
    pass


def largest_batch(step: Callable[[int], None], start: int = 8, limit: int = 4096, multiple: int = 8) -> int:
    """Largest batch (a multiple of ``multiple``, within 1/8 of the true limit) for which ``step(batch)`` runs
    without ``torch.cuda.OutOfMemoryError``. ``step`` should run a full forward + backward at that batch."""

    def fits(b: int) -> bool:
        try:
            step(b)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    b, ok = max(start, multiple), None
    while b <= limit and fits(b):
        ok, b = b, b * 2
    if ok is None:
        raise ProbeError(f"even a batch of {max(start, multiple)} does not fit in device memory; use a smaller "
                         "train.model, shard.resolution, or train.grad_checkpointing: true")
    lo, hi = ok, min(b, limit + multiple)
    while hi - lo > max(multiple, lo // 8):
        mid = (lo + hi) // 2 // multiple * multiple
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fit_to_effective(batch: int, effective_batch: int | None, world: int) -> int:
    """The largest batch <= ``batch`` that still divides the target effective batch across ``world`` devices."""
    if effective_batch is None:
        return batch
    for b in range(min(batch, effective_batch // world), 0, -1):
        if effective_batch % (b * world) == 0:
            return b
    return 1


def probe_batch(cfg, index, device: torch.device, world: int, master: bool):
    """Replace train.batch_size by the largest per-device batch that fits (CUDA only; agreed across ranks)."""
    from tasks.core import runtime
    from tasks.model import build as tmodel

    if device.type != "cuda":
        if master:
            print("train: probe_batch needs a CUDA device (a CPU has no out-of-memory signal); keeping "
                  f"batch_size={cfg.batch_size}", file=sys.stderr)
        return cfg
    model, _ = tmodel.build_model(cfg.model_copy(update={"pretrained": "none"}), len(index.classes),
                                  index.channels, index.resolution)
    model.to(device).train()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.precision(cfg.precision, device, "train.precision"))

    def step(b: int) -> None:
        x = torch.randn(b, index.channels, index.resolution, index.resolution, device=device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            model(x).float().logsumexp(1).mean().backward()
        model.zero_grad(set_to_none=True)

    found = fit_to_effective(largest_batch(step), cfg.effective_batch, world)
    model.to("cpu")  # give the probe's memory back before the real model is built
    torch.cuda.empty_cache()
    agreed = torch.tensor([found], device=device)
    if world > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if master:
        print(f"train: probe_batch: largest per-device batch that fits is {int(agreed)} "
              f"(was {cfg.batch_size})", file=sys.stderr)
    return cfg.model_copy(update={"batch_size": int(agreed)})
