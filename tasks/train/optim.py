"""The optimiser (AdamW or Nesterov SGD over named parameter groups) and the per-step LR schedule (timm's)."""
from __future__ import annotations

import torch

from tasks.model import build as tmodel

_NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def param_groups(model: torch.nn.Module, lr: float, backbone_lr: float, weight_decay: float,
                 norm_bias_lr_factor: float = 1.0) -> list[dict]:
    """Head vs backbone (own LRs), decay vs no decay, and normalisation biases (their own LR factor, airbench's
    64x) as separate groups, in a fixed order so the optimiser state lines up on a resume."""
    head = {id(p) for p in tmodel.head_parameters(model)}
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, _NORM_LAYERS) and m.bias is not None} \
        if norm_bias_lr_factor != 1.0 else set()
    groups: dict[tuple[bool, bool, bool], list] = {}
    for p in model.parameters():
        # no weight decay on biases and norm scales (1-D tensors): the usual practice, as timm's param_groups
        groups.setdefault((id(p) in head, p.ndim > 1, id(p) in norm_biases), []).append(p)
    out = []
    for (is_head, decay, norm_bias), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        base = lr if is_head else backbone_lr
        out.append({"params": ps, "lr": base * (norm_bias_lr_factor if norm_bias else 1.0),
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{'head' if is_head else 'backbone'}{'' if decay else '_no_decay'}"
                            f"{'_norm_bias' if norm_bias else ''}"})
    return out


def build_optimizer(cfg, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)


def build_scheduler(cfg, opt: torch.optim.Optimizer, groups: list[dict], total_steps: int):
    """Warm-up from a tenth of the floor, then cosine (or linear) decay to ``lr_floor`` x the smallest group LR;
    stepped once per optimiser step (``step_update``), not per epoch."""
    from timm.scheduler import CosineLRScheduler, PolyLRScheduler

    floor = cfg.lr_floor * min(g["lr"] for g in groups)
    sched_cls = CosineLRScheduler if cfg.schedule == "cosine" else PolyLRScheduler
    extra = {} if cfg.schedule == "cosine" else {"power": 1.0}
    return sched_cls(opt, t_initial=total_steps, lr_min=floor, warmup_t=cfg.warmup_steps,
                     warmup_lr_init=floor * 0.1, t_in_epochs=False, **extra)
