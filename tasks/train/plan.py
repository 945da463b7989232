"""How many images one optimiser step sees and how many steps the run takes: pure arithmetic on the config."""
from __future__ import annotations

from dataclasses import dataclass

from tasks.train.errors import TrainError


@dataclass(frozen=True)
class BatchPlan:
    accumulation: int       # micro-batches per optimiser step
    effective: int          # images per optimiser step, over every rank
    steps_per_epoch: int
    total_steps: int
    scaled_lr: float        # cfg.lr at cfg.reference_batch, linearly scaled to ``effective``

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accumulation

    def is_log_step(self, step: int, log_every: int) -> bool:
        """The read-back points: every ``log_every`` steps and the run's last step."""
        return step % log_every == 0 or step == self.total_steps

    @classmethod
    def make(cls, cfg, world: int, batches_per_epoch, n_items: int) -> BatchPlan:
        """``batches_per_epoch(global_batch)``: how many global batches the data yields per epoch."""
        accumulation = 1
        if cfg.effective_batch is not None:
            accumulation = cfg.effective_batch // (cfg.batch_size * world)
        effective = cfg.batch_size * world * accumulation
        steps_per_epoch = batches_per_epoch(cfg.batch_size * world) // accumulation
        if steps_per_epoch == 0:
            raise TrainError(f"train.batch_size={cfg.batch_size} x devices {world} x accumulation {accumulation} = "
                             f"{effective} is larger than the train split ({n_items} items)")
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        scaled_lr = cfg.lr * effective / cfg.reference_batch  # the linear scaling rule
        return cls(accumulation, effective, steps_per_epoch, total_steps, scaled_lr)
