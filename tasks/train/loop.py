"""keel train: the stage's entry point. ``run`` checks the launch, sets up the process group, builds the trainer
(tasks/train/setup.py) and runs ``Trainer.fit`` (tasks/train/trainer.py; the loop and its events are drawn in
tasks/train/callbacks/__init__.py).

Runs under torchrun (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from the environment; gloo on CPU, NCCL on GPU) or as a
plain process. Only rank 0 logs and writes; every write is atomic. Reads the train and val shards only.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from tasks.core import runtime
from tasks.core.config import Paths, TrainConfig
from tasks.train.errors import TrainError
from tasks.train.logger import MetricLogger, OpenTracker
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


def end_status(exc: BaseException | None) -> str:
    """The tracking run's end: KILLED for SIGTERM (exit 143) or Ctrl-C, FAILED for any other exception."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM):
        return "KILLED"
    return "FAILED"


def run(cfg: TrainConfig, paths: Paths, logger: MetricLogger | None = None, *,
        tracker: OpenTracker | None = None) -> TrainResult:
    """Train; the tracking run (rank 0) is closed here whatever happens: FINISHED, FAILED or KILLED. It is either
    ``logger``, already open, or what ``tracker`` opens once set-up has read last.pt (so that a resumed training
    continues the run it started, see ``tasks.train.logger.OpenTracker``)."""
    import torch.distributed as dist

    from tasks.train import setup
    from tasks.train.distributed import Dist

    if logger is not None and tracker is not None:
        raise ValueError("pass an open logger or a tracker that opens one, not both")
    trainer, exc = None, None
    world, rank, local_rank = runtime.dist_env()
    try:
        _check_launch(cfg, world)
        device = runtime.device(cfg.device, "train.device", local_rank, cfg.devices)
        precision = runtime.precision(cfg.precision, device, "train.precision")
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist_ = Dist(world, rank, device, cfg.strategy == "fsdp" and world > 1)
        trainer = (setup.build(cfg, paths, logger, dist_, precision) if tracker is None
                   else setup.build(cfg, paths, None, dist_, precision, tracker=tracker))
        return trainer.fit()
    except BaseException as e:
        exc = e
        raise
    finally:
        opened = logger if tracker is None else getattr(trainer, "tracker", None)
        _close((getattr(trainer, "files", None), opened), end_status(exc), failing=exc is not None)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _close(loggers, status: str, failing: bool) -> None:
    """End the file log and the tracking run (the one place they end). Every one is closed even when another's
    close fails; a failure while another error is on its way out is reported, not raised, so the first error
    stays the one the user sees. A SIGTERM arriving meanwhile waits until the run is ended (``_sigterm_deferred``)."""
    first: Exception | None = None
    with _sigterm_deferred(redeliver=not failing):
        for lg in loggers:
            if lg is None:
                continue
            try:
                lg.close(status)
            except Exception as e:  # noqa: BLE001 - whatever it is, the other logger is still closed
                first = first or e
                if failing or first is not e:
                    print(f"train: could not close {type(lg).__name__} ({status}): {e}", file=sys.stderr)
    if first is not None and not failing:
        raise first


@contextlib.contextmanager
def _sigterm_deferred(redeliver: bool) -> Iterator[None]:
    """Hold SIGTERM while the tracking run is being ended: the handler outside the fit (tasks.train.entry) exits
    at once, which in the middle of the close would leave the run RUNNING. Delivered again afterwards (unless an
    error is already ending the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)  # None: not set from Python
        if seen and redeliver:
            signal.raise_signal(signal.SIGTERM)
