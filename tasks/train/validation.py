"""Validation (and evaluate's scoring): loss and accuracy of a model over a device-resident split."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.model import views
from tasks.train import data as tdata


@torch.no_grad()
def evaluate(model: torch.nn.Module, norm: torch.nn.Module, split: tdata.DeviceSplit, autocast, batch: int = 1024,
             channels_last: bool = False, tta: str = "none") -> tuple[float, float, float]:
    """(loss, accuracy, single-view accuracy) on ``split``; with ``tta`` the first two are the views' average."""
    model.eval()
    sums = torch.zeros(3, device=split.y.device)  # loss, correct, single-view correct: read back once
    for s in range(0, split.n, batch):
        x = norm(split.x[s:s + batch])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, plain = views.tta_logits(model, x, tta)
        y = split.y[s:s + batch]
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += (plain.argmax(1) == y).sum()
    model.train()
    total_loss, correct, plain_correct = sums.tolist()  # the validation's one host-device sync point
    n = max(split.n, 1)
    return total_loss / n, int(correct) / n, int(plain_correct) / n
