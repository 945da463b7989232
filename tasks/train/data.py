"""Training data on the device: the shards' uint8 images live on the device, batches are index lists, and
augmentation runs there too (no per-sample CPU work in the step).

Batch order and augmentation parameters are pure functions of (seed, epoch, batch index) over the *global* batch,
and each rank takes its slice of every global batch. So N processes with per-device batch B see exactly what one
process with batch N x B sees (the DDP equivalence test relies on it), and a resumed run replays the same batches.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from tasks.core import io


class DeviceSplit:
    """One split (train or val) as a uint8 NCHW tensor plus int64 labels, on ``device``."""

    def __init__(self, shards_dir: str, split: str, device: torch.device):
        reader = io.ShardReader(shards_dir, split)  # verifies checksums; refuses the test split
        x, y, _ = reader.read_all()
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
        self.y = torch.from_numpy(y).to(device)
        self.n = len(self.y)


def first_images(shards_dir: str, split: str, n: int, device: torch.device) -> torch.Tensor:
    """The split's first ``n`` images in shard order (uint8 NCHW on ``device``), reading only the shards needed."""
    reader = io.ShardReader(shards_dir, split, verify=False)  # the caller's DeviceSplit/StreamSplit verified them
    parts, have = [], 0
    for x, _, _ in reader.iter_batches(batch_rows=min(n, 8192)):
        parts.append(torch.from_numpy(x[:n - have]))
        have += len(parts[-1])
        if have >= n:
            break
    return torch.cat(parts).permute(0, 3, 1, 2).contiguous().to(device)


def _generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63))


def global_batches(n: int, global_batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's global batches (index tensors, drop-last), in a seeded order."""
    perm = torch.randperm(n, generator=_generator(seed, epoch, 0))
    return [perm[b * global_batch:(b + 1) * global_batch] for b in range(n // global_batch)]


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = len(batch) // world
    return batch[rank * per:(rank + 1) * per]


def augment_params(global_batch: int, size: int, seed: int, epoch: int, index: int, pad: int) -> dict:
    g = _generator(seed, epoch, 1 + index)
    return {"dy": torch.randint(0, 2 * pad + 1, (global_batch,), generator=g),
            "dx": torch.randint(0, 2 * pad + 1, (global_batch,), generator=g),
            "flip": torch.rand(global_batch, generator=g) < 0.5}


def flip_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop-with-reflect-padding and horizontal flip, batched on the device."""
    b, c, h, w = x.shape
    dev = x.device
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    rows = (dy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
             rows, cols]
    return torch.where(flip.to(dev)[:, None, None, None], out.flip(3), out)


def iterate_epoch(split: DeviceSplit, per_device_batch: int, world: int, rank: int, seed: int, epoch: int,
                  augment: str, start_batch: int = 0, crop_pad: int | None = None
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (batch index, images float [0,255], labels) for this rank, from ``start_batch`` (resume).
    ``crop_pad``: the random crop's reflect padding in px (None: an eighth of the side, at least 1)."""
    gb = per_device_batch * world
    batches = global_batches(split.n, gb, seed, epoch)
    size = split.x.shape[-1]
    pad = crop_pad or max(1, size // 8)
    for i in range(start_batch, len(batches)):
        idx = rank_slice(batches[i], rank, world).to(split.x.device)
        x = split.x[idx]
        if augment == "flip_crop":
            p = augment_params(gb, size, seed, epoch, i, pad)
            sl = slice(rank * per_device_batch, (rank + 1) * per_device_batch)
            x = flip_crop(x, p["dy"][sl], p["dx"][sl], p["flip"][sl], pad)
        yield i, x.float(), split.y[idx]


def steps_per_epoch(n: int, per_device_batch: int, world: int, accumulation: int) -> int:
    return (n // (per_device_batch * world)) // accumulation


# ---------------------------------------------------------------- streaming (sets that do not fit on the device)
class _ShardStream(torch.utils.data.IterableDataset):
    """Global batches of uint8 HWC images streamed from parquet shards, for one epoch.

    Shard order is a seeded permutation per epoch; worker k reads shards k, k+W, ... of that order, shuffles the
    rows of each shard, and carries leftovers into its next shard. The DataLoader returns the workers' batches in
    round-robin order, so the sequence depends only on (seed, epoch, workers): every DDP rank builds the same global
    batches and takes its own slice, exactly as with device-resident data.
    """

    def __init__(self, shards_dir: str, files: list[str], hwc: tuple[int, int, int], global_batch: int, seed: int,
                 epoch: int):
        super().__init__()
        self.dir, self.files, self.hwc, self.gb, self.seed, self.epoch = shards_dir, files, hwc, global_batch, seed, epoch

    def __iter__(self):
        import numpy as np
        import pyarrow.parquet as pq

        info = torch.utils.data.get_worker_info()
        k, w = (info.id, info.num_workers) if info is not None else (0, 1)
        order = torch.randperm(len(self.files), generator=_generator(self.seed, self.epoch, 0)).tolist()
        xs, ys = np.zeros((0, *self.hwc), np.uint8), np.zeros(0, np.int64)
        for j in order[k::w]:
            t = pq.read_table(f"{self.dir}/{self.files[j]}", columns=["image", "label"])
            x = io.decode_image_column(t.column("image"), self.hwc)
            y = t.column("label").to_numpy().astype(np.int64)
            perm = torch.randperm(len(y), generator=_generator(self.seed, self.epoch, 1_000 + j)).numpy()
            xs, ys = np.concatenate([xs, x[perm]]), np.concatenate([ys, y[perm]])
            while len(ys) >= self.gb:
                yield torch.from_numpy(xs[:self.gb].copy()), torch.from_numpy(ys[:self.gb].copy())
                xs, ys = xs[self.gb:], ys[self.gb:]


class StreamSplit:
    """The train split read from its shards each epoch with worker processes, pinned memory and prefetching."""

    def __init__(self, shards_dir: str, split: str, device: torch.device, workers: int):
        reader = io.ShardReader(shards_dir, split)  # verifies checksums once; refuses the test split
        self.dir, self.device, self.workers = shards_dir, device, workers
        self.files = [f.file for f in reader.files]
        self.n = len(reader)
        ix = reader.index
        self.hwc = (ix.resolution, ix.resolution, ix.channels)

    def batches_per_epoch(self, global_batch: int) -> int:
        # each worker may drop up to one partial batch: a lower bound that holds for every epoch's shard order
        return max(0, self.n // global_batch - max(1, self.workers))

    def epoch(self, global_batch: int, seed: int, epoch: int) -> torch.utils.data.DataLoader:
        ds = _ShardStream(self.dir, self.files, self.hwc, global_batch, seed, epoch)
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.workers,
                                           pin_memory=self.device.type == "cuda",
                                           prefetch_factor=4 if self.workers else None,
                                           persistent_workers=False)


def iterate_stream(split: StreamSplit, per_device_batch: int, world: int, rank: int, seed: int, epoch: int,
                   augment: str, start_batch: int = 0, crop_pad: int | None = None
                   ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    gb = per_device_batch * world
    size = split.hwc[0]
    pad = crop_pad or max(1, size // 8)
    sl = slice(rank * per_device_batch, (rank + 1) * per_device_batch)
    for i, (xb, yb) in enumerate(split.epoch(gb, seed, epoch)):
        if i < start_batch:
            continue
        x = xb[sl].to(split.device, non_blocking=True).permute(0, 3, 1, 2)
        y = yb[sl].to(split.device, non_blocking=True)
        if augment == "flip_crop":
            p = augment_params(gb, size, seed, epoch, i, pad)
            x = flip_crop(x, p["dy"][sl], p["dx"][sl], p["flip"][sl], pad)
        yield i, x.float(), y
