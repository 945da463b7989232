"""Training data behind one interface, whether it lives on the device or streams from the shards: ``batches``
yields (index, images, labels) for this rank from a start index; ``micro_batches`` adds normalisation, Mixup/CutMix
and the host-side timing."""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from tasks.train import data as tdata
from tasks.train.errors import TrainError


def data_mode(cfg, need: int, device: torch.device) -> str:
    """device-resident data is the fast path when it fits (CIFAR-10 at 32 px is 150 MB); larger sets stream."""
    budget = (torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda" else 8 << 30)
    mode = cfg.data if cfg.data != "auto" else ("device" if need <= budget else "stream")
    if mode == "device" and need > budget:
        raise TrainError(f"train.data=device: train+val images need {need / 2**30:.1f} GiB as uint8, over the "
                         f"{budget / 2**30:.1f} GiB device budget; use train.data: stream (or auto)")
    return mode


class TrainFeed:
    def __init__(self, cfg, shards_dir: str, mode: str, device: torch.device, world: int, rank: int):
        self.cfg, self.mode, self.world, self.rank = cfg, mode, world, rank
        if mode == "stream":
            self.split = tdata.StreamSplit(shards_dir, "train", device, cfg.loader_workers)
        else:
            self.split = tdata.DeviceSplit(shards_dir, "train", device)
        self.n = self.split.n

    def batches_per_epoch(self, global_batch: int) -> int:
        if self.mode == "stream":
            return self.split.batches_per_epoch(global_batch)
        return self.n // global_batch

    def batches(self, batch_size: int, epoch: int, start_batch: int) -> Iterator:
        cfg = self.cfg
        iterate = tdata.iterate_stream if self.mode == "stream" else tdata.iterate_epoch
        seed = cfg.seed if cfg.shuffle_seed is None else cfg.shuffle_seed
        return iterate(self.split, batch_size, self.world, self.rank, seed, epoch, cfg.augment,
                       start_batch=start_batch, crop_pad=cfg.crop_pad)


def micro_batches(batches: Iterator, norm, mixup_fn, channels_last: bool, window, world: int,
                  more: callable) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(index, model input, target, labels) until ``more(index)`` says stop. Mixup draws from NumPy's RNG, in
    batch order (seeded, checkpointed). ``window.wait`` gets the host time spent getting each batch (no sync)."""
    t_fetch = time.perf_counter()
    for i, x, y in batches:
        if not more(i):
            return
        x = norm(x)
        target = y
        if mixup_fn is not None:
            x, target = mixup_fn(x, y)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        window.t_compute = time.perf_counter()
        window.wait += window.t_compute - t_fetch
        window.imgs += len(y) * world
        yield i, x, target, y
        window.compute_done()  # a micro-batch that did not end a step; the step's end closes it itself
        t_fetch = time.perf_counter()
