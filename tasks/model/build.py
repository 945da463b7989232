"""Model construction from timm, transfer-learning initialisation, and freezing for the two-phase recipe."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.core import checkpoint
from tasks.core.config import TrainConfig
from tasks.core.errors import UserError

WHITEN_IMAGES = 5_000  # train images whose 2x2 patches set a whitening stem (airbench's number)


class ModelConfigError(UserError, ValueError):
    """A train.* setting that cannot build a model; the message names the key."""


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, resolution: int) -> tuple[nn.Module, dict]:
    """timm model with a fresh ``num_classes`` head; returns (model, init report)."""
    import timm

    from tasks.model import nets  # registers keel's small networks with timm

    if cfg.model not in timm.list_models() and cfg.model not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{cfg.model.split('.')[0][:6]}*")[:8]
        raise ModelConfigError(f"train.model: unknown timm model {cfg.model!r}" + (f"; close names: {close}" if close else ""))
    model = timm.create_model(cfg.model, pretrained=cfg.pretrained == "timm", num_classes=num_classes,
                              in_chans=in_chans, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    report: dict = {"model": cfg.model, "pretrained": cfg.pretrained}
    if isinstance(model, nets.KeelCifarNet):
        if resolution < nets.MIN_RESOLUTION:
            raise ModelConfigError(f"train.model: {cfg.model} needs images of at least {nets.MIN_RESOLUTION} px (a 2x2 "
                                   f"stem, then three 2x max-pools); shard.resolution is {resolution}")
        report["stem"] = "2x2 stride 1 (built for small inputs)"
    elif cfg.small_input_stem and resolution <= 64 and isinstance(getattr(model, "conv1", None), nn.Conv2d) \
            and hasattr(model, "maxpool"):
        # ResNets downsample 4x in the stem, which leaves 2x2 maps at 32 px: the CIFAR-style stem keeps resolution
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        report["stem"] = "3x3 stride 1, no max-pool"
    elif cfg.small_input_stem and resolution <= 64:
        # e.g. resnet10t/resnet26d: a deep (3-conv) stem; rebuilding it is a different architecture, so keep timm's
        report["stem"] = "timm default (small_input_stem applies to single-conv ResNet stems only)"
    if cfg.pretrained == "checkpoint":
        report.update(load_init_checkpoint(model, Path(cfg.init_checkpoint)))
    return model, report


def whiten_stem(cfg: TrainConfig, model: nn.Module, images: torch.Tensor) -> dict:
    """``train.stem_init: whiten``: the stem's filters become the whitening transform of ``images``' patches."""
    from tasks.model import nets

    if not hasattr(model, "whiten_stem"):
        raise ModelConfigError(f"train.stem_init: whiten needs a model with a whitening stem (keel_cifar_net, "
                               f"keel_cifar_net_s); {cfg.model} has none: set train.stem_init: default")
    try:
        return model.whiten_stem(images)
    except nets.StemInitError as e:
        raise ModelConfigError(f"train.stem_init: {e}") from e


def load_init_checkpoint(model: nn.Module, path: Path) -> dict:
    """Load a keel checkpoint (or a plain state dict) for transfer: every tensor whose name and shape match;
    the classifier is left freshly initialised when its shape differs (a different class set)."""
    if not path.exists():
        raise ModelConfigError(f"train.init_checkpoint: {path} does not exist")
    try:
        blob = checkpoint.load(path, what="init checkpoint")
    except checkpoint.UnsafeCheckpointError as e:
        raise ModelConfigError(f"train.init_checkpoint: {e}") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else blob
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in loaded)
    if not loaded:
        raise ModelConfigError(f"train.init_checkpoint: {path} shares no tensor with train.model; wrong architecture?")
    model.load_state_dict(loaded, strict=False)
    return {"init_checkpoint": str(path), "loaded_tensors": len(loaded), "skipped_tensors": skipped}


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_classifier().parameters())


def backbone_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameter groups from the stem to the last block (timm's coarse group matcher), head excluded."""
    from timm.models import group_parameters

    head = {id(p) for p in head_parameters(model)}
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    out = []
    for _, names in sorted(groups.items()):
        ps = [named[n] for n in names if id(named[n]) not in head]
        if ps:
            out.append(ps)
    return out


def set_phase(model: nn.Module, phase: int, unfreeze_top_blocks: int) -> int:
    """Phase 1: only the head trains. Phase 2: the top ``unfreeze_top_blocks`` backbone groups (0 = all) train
    too. Returns the number of trainable parameters."""
    groups = backbone_groups(model)
    for g in groups:
        for p in g:
            p.requires_grad = phase == 2 and unfreeze_top_blocks == 0
    if phase == 2 and unfreeze_top_blocks:
        for g in groups[-unfreeze_top_blocks:]:
            for p in g:
                p.requires_grad = True
    for p in head_parameters(model):
        p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
