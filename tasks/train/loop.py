"""keel train: the stage's entry point. ``run`` checks the launch, sets up the process group, builds the trainer
(tasks/train/setup.py) and runs ``Trainer.fit`` (tasks/train/trainer.py; the loop and its events are drawn in
tasks/train/callbacks/__init__.py).

Runs under torchrun (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from the environment; gloo on CPU, NCCL on GPU) or as a
plain process. Only rank 0 logs and writes; every write is atomic. Reads the train and val shards only.
"""
from __future__ import annotations

import os
import signal
import sys

from tasks.core import runtime
from tasks.core.config import Paths, TrainConfig
from tasks.train.errors import TrainError
from tasks.train.logger import MetricLogger
from tasks.train.state import TrainResult
from tasks.train.validation import evaluate

__all__ = ["TrainError", "TrainResult", "evaluate", "run"]


def _check_launch(cfg: TrainConfig, world: int) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))  # processes on this node (torchrun sets it)
    if local_world != cfg.devices:
        raise TrainError(f"train.devices={cfg.devices} but the launcher started {local_world} process(es) on this "
                         "node; launch with `torchrun --nproc_per_node=${train.devices}` (dvc.yaml does)")
    if cfg.effective_batch is not None and cfg.effective_batch % (cfg.batch_size * world):
        raise TrainError(f"train.effective_batch={cfg.effective_batch} is not a multiple of batch_size x world size "
                         f"= {cfg.batch_size} x {world}")


def _status(exc: BaseException | None) -> str:
    """The tracking run's end: KILLED for SIGTERM (exit 143) or Ctrl-C, FAILED for any other exception."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM):
        return "KILLED"
    return "FAILED"


def run(cfg: TrainConfig, paths: Paths, logger: MetricLogger | None = None) -> TrainResult:
    """Train; ``logger`` (the tracking run, rank 0) is closed here whatever happens: FINISHED, FAILED or KILLED."""
    import torch.distributed as dist

    from tasks.train import setup
    from tasks.train.distributed import Dist

    trainer, exc = None, None
    world, rank, local_rank = runtime.dist_env()
    try:
        _check_launch(cfg, world)
        device = runtime.device(cfg.device, "train.device", local_rank, cfg.devices)
        precision = runtime.precision(cfg.precision, device, "train.precision")
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        trainer = setup.build(cfg, paths, logger, Dist(world, rank, device, cfg.strategy == "fsdp" and world > 1),
                              precision)
        return trainer.fit()
    except BaseException as e:
        exc = e
        raise
    finally:
        _close((getattr(trainer, "files", None), logger), _status(exc), failing=exc is not None)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _close(loggers, status: str, failing: bool) -> None:
    """End the file log and the tracking run (the one place they end). A close that fails while another error
    is on its way out is reported, not raised, so the first error stays the one the user sees."""
    for lg in loggers:
        if lg is None:
            continue
        try:
            lg.close(status)
        except Exception as e:
            if not failing:
                raise
            print(f"train: could not close {type(lg).__name__} ({status}): {e}", file=sys.stderr)
