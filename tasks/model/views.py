"""A trained model's input views: the normalisation fit on train (``Normalize``) and the test-time views
(``tta_logits``). Validation, evaluate and the served model all call these, so they are part of the model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "flip", "flip_translate")


def tta_logits(model: torch.nn.Module, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time augmentation, part of a trained model's definition (``train.tta``): validation, evaluate and the
    served model all call this. Returns (the views' mean logits, the plain single-view logits).

    flip: the image and its mirror. flip_translate: those two, averaged with the mirrored pairs of the image
    shifted by 1 px up-left and down-right (reflect padding), weighted half and half (airbench's level 2)."""
    plain = model(x)
    if mode == "none":
        return plain, plain
    if mode not in TTA_MODES:
        raise ValueError(f"unknown tta mode {mode!r} (one of {TTA_MODES})")
    logits = 0.5 * (plain + model(x.flip(-1)))
    if mode == "flip_translate":
        h, w = x.shape[-2:]
        xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [xp[..., :h, :w], xp[..., 2:h + 2, 2:w + 2]]
        moved = sum(0.5 * (model(v) + model(v.flip(-1))) for v in shifted) / len(shifted)
        logits = 0.5 * logits + 0.5 * moved
    return logits, plain


class Normalize(torch.nn.Module):
    """uint8/float [0,255] NCHW -> normalised float with the shard index's train-only mean/std."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std
