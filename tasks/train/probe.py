"""The "largest batch that fits" probe (GPU): doubling, then bisection, on CUDA out-of-memory errors."""
from __future__ import annotations

from collections.abc import Callable

import torch


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
