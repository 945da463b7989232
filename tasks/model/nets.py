"""Small networks sized for small images, registered with timm so every keel path (``train.model``, evaluate,
serving, preflight, the probe) builds them by name through ``timm.create_model``, like any timm model.

``keel_cifar_net`` follows the network of the airbench CIFAR-10 speed runs (Keller Jordan, 2024,
https://github.com/KellerJordan/cifar10-airbench): a 2x2 patch stem, three conv groups (conv, max-pool,
BatchNorm, GELU, conv, BatchNorm, GELU) of widths 64/256/256, a global max-pool and a bias-free linear head
whose logits are scaled by 1/9. BatchNorm keeps its scale fixed at 1 (only the shift trains) and uses fast
running statistics, which the short schedules need.

The stem's 2x2 filters can be set from data: :meth:`KeelCifarNet.whiten_stem` makes them the whitening (PCA)
transform of the training images' 2x2 patches, in +/- pairs, and freezes them, as airbench does. The train stage
calls it when ``train.stem_init: whiten``; a checkpoint carries the filters, so evaluate and serving need no data.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

__all__ = ["KeelCifarNet", "StemInitError", "keel_cifar_net", "keel_cifar_net_s"]

MIN_RESOLUTION = 16  # 2x2 stem (-1 px), then three 2x max-pools: 16 -> 15 -> 7 -> 3 -> 1


class StemInitError(ValueError):
    """The data given to :meth:`KeelCifarNet.whiten_stem` cannot whiten this stem."""


class _BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)  # scale fixed at 1: only the shift trains


class _ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _BatchNorm(c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class KeelCifarNet(nn.Module):
    """airbench-style CIFAR network with timm's model interface (classifier access, parameter groups)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 stem_width: int | None = None, logit_scale: float = 1 / 9, drop_rate: float = 0.0, **kwargs: Any):
        super().__init__()
        # timm's factory passes these to every model: no residual paths to drop, no hub weights to describe
        for k in ("drop_path_rate", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        if kwargs:
            raise TypeError(f"KeelCifarNet: unexpected arguments {sorted(kwargs)}")
        self.num_classes, self.in_chans, self.logit_scale, self.drop_rate = num_classes, in_chans, logit_scale, drop_rate
        self.num_features = widths[-1]
        stem_width = stem_width or 2 * in_chans * 2 * 2  # one +/- pair per whitening direction of a 2x2 patch
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, padding=0, bias=True), nn.GELU())
        self.stages = nn.Sequential(_ConvGroup(stem_width, widths[0]), _ConvGroup(widths[0], widths[1]),
                                    _ConvGroup(widths[1], widths[2]))
        self.global_pool = nn.AdaptiveMaxPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.stem[0]:
                nn.init.dirac_(m.weight[:m.in_channels])  # identity-like start for the first in_channels filters
                # (the rest keep PyTorch's default init), as airbench does

    @torch.no_grad()
    def whiten_stem(self, images: torch.Tensor, eps: float = 5e-4) -> dict:
        """Set the stem's filters to the whitening transform of ``images``' 2x2 patches and freeze them.

        ``images``: normalised float NCHW training images (airbench uses 5,000). The patch covariance's
        eigenvectors, each divided by sqrt(eigenvalue + eps), become filters ``w`` and ``-w`` (the GELU after the
        stem would drop half of each direction otherwise). The stem's bias keeps training. Returns a report."""
        conv = self.stem[0]
        kh, kw = conv.kernel_size
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise StemInitError(f"whiten_stem: images must be N x {self.in_chans} x H x W, got {tuple(images.shape)}")
        dims = self.in_chans * kh * kw
        if conv.out_channels != 2 * dims:
            raise StemInitError(f"whiten_stem: the stem has {conv.out_channels} filters; whitening {kh}x{kw} patches "
                                f"of {self.in_chans} channels needs 2 x {dims} = {2 * dims} (stem_width)")
        x = images.float()
        patches = x.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, dims)
        if len(patches) < dims:
            raise StemInitError(f"whiten_stem: {len(patches)} patches cannot estimate a {dims}x{dims} covariance")
        cov = (patches.T @ patches / len(patches)).double()
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        filters = (evecs.T / torch.sqrt(evals + eps)[:, None]).reshape(dims, self.in_chans, kh, kw)
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
        conv.weight.requires_grad_(False)
        return {"stem_init": "whiten", "whiten_images": int(images.shape[0]), "whiten_patches": len(patches),
                "whiten_top_eigenvalues": [round(float(v), 4) for v in evals[:3]]}

    # ---- timm's model interface
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("keel_cifar_net: gradient checkpointing is not implemented (it is small)")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, bias=False) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(pretrained: bool, **kwargs: Any) -> KeelCifarNet:
    if pretrained:
        raise ValueError("keel_cifar_net* have no published weights: use train.pretrained: none, or checkpoint "
                         "with train.init_checkpoint")
    return KeelCifarNet(**kwargs)


@register_model
def keel_cifar_net(pretrained: bool = False, **kwargs: Any) -> KeelCifarNet:
    """airbench94's widths (64/256/256): about 118 M multiply-adds per 32 px image."""
    return _create(pretrained, **kwargs)


@register_model
def keel_cifar_net_s(pretrained: bool = False, **kwargs: Any) -> KeelCifarNet:
    """A quarter of the widths (32/64/64): for CPU smoke runs and the digits-sized sets."""
    return _create(pretrained, widths=(32, 64, 64), **kwargs)
