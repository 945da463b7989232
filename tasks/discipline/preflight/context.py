"""What the model checks share: the device, precision and seeding of the train stage, the train split on the
device, the normaliser, and a way to build the configured model from the same initialisation every time."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tasks.core import io, runtime
from tasks.core.config import Paths, TrainConfig
from tasks.discipline.preflight.report import PreflightReport
from tasks.model import build as tmodel
from tasks.model import views
from tasks.train import data as tdata


@dataclass
class Ctx:
    cfg: TrainConfig
    device: torch.device
    train: tdata.DeviceSplit
    norm: torch.nn.Module
    autocast: Callable[[], object]
    fresh_model: Callable[..., torch.nn.Module]
    num_classes: int
    min_busy: float = 0.7
    busy_goal: float = 0.95

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def optimizer(self, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=self.cfg.momentum, nesterov=True,
                               weight_decay=weight_decay)

    def first_items(self, n: int) -> torch.Tensor:
        """Indices of ``n`` train items in a seeded order (the same for every check)."""
        perm = torch.randperm(self.train.n, generator=torch.Generator().manual_seed(self.cfg.seed))
        return perm[:n].to(self.train.x.device)


def prepare(cfg: TrainConfig, paths: Paths, min_busy: float, busy_goal: float) -> tuple[PreflightReport, Ctx]:
    """The train stage's set-up for ``cfg`` (device, precision, seed, train split) and an empty report of it.
    Raises ``DataError`` when the shards are missing or fail verification."""
    device = runtime.device(cfg.device, "train.device", 0, cfg.devices)
    precision = runtime.precision(cfg.precision, device, "train.precision")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    runtime.seed_everything(cfg.seed, cfg.deterministic)
    index = io.ShardIndex.load(paths.shards_dir)
    train = tdata.DeviceSplit(paths.shards_dir, "train", device)  # ShardReader: verified, test split refused
    norm = views.Normalize(index.mean, index.std).to(device)
    num_classes = len(index.classes)
    report = PreflightReport("train", cfg.model, str(device), precision, train.n, num_classes, cfg.seed)

    def fresh_model(c: TrainConfig = cfg) -> torch.nn.Module:
        runtime.seed_everything(c.seed, c.deterministic)  # each check starts from the same initialisation
        model, _ = tmodel.build_model(c, num_classes, index.channels, index.resolution)
        model.to(device)
        if c.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    return report, Ctx(cfg, device, train, norm, autocast, fresh_model, num_classes, min_busy, busy_goal)
