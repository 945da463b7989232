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

from tasks import io


class DeviceSplit:
    """One split (train or val) as a uint8 NCHW tensor plus int64 labels, on ``device``."""

    def __init__(self, shards_dir: str, split: str, device: torch.device):
        reader = io.ShardReader(shards_dir, split)  # verifies checksums; refuses the test split
        x, y, _ = reader.read_all()
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
        self.y = torch.from_numpy(y).to(device)
        self.n = len(self.y)


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


class Normalize(torch.nn.Module):
    """uint8/float [0,255] NCHW -> normalised float with the shard index's train-only mean/std."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def iterate_epoch(split: DeviceSplit, per_device_batch: int, world: int, rank: int, seed: int, epoch: int,
                  augment: str, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (batch index, images float [0,255], labels) for this rank, from ``start_batch`` (resume)."""
    gb = per_device_batch * world
    batches = global_batches(split.n, gb, seed, epoch)
    size = split.x.shape[-1]
    pad = max(1, size // 8)
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
