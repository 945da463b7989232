"""What differs between one process, DDP and FSDP2: wrapping, the full (unsharded) state dicts that every
checkpoint holds, the global-batch mean of a scalar, and ``agree`` -- the one way ranks take a decision together."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def fully_shard(model: torch.nn.Module) -> None:
    """FSDP2: one sharding unit per block (each child of a top-level Sequential/ModuleList, e.g. resnet layers'
    blocks, ViT blocks, ConvNeXt stages), then the root for what is left (stem, head)."""
    from torch.distributed.fsdp import fully_shard as shard

    for child in model.children():
        many = isinstance(child, torch.nn.Sequential | torch.nn.ModuleList) and len(child) > 1
        for unit in (child.children() if many else [child]):
            if any(p.requires_grad for p in unit.parameters()):
                shard(unit)
    shard(model)


@dataclass
class Dist:
    world: int
    rank: int
    device: torch.device
    fsdp: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: an all_reduce(MAX), the only cross-rank decision the
        loop takes (SIGTERM, early stopping). Called only where the loop already reads back (one sync)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() > 0  # a host-device sync point, shared with the read-back around it

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (SUM then / world, in that float order), stays on the device."""
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world
        return value

    def wrap(self, model: torch.nn.Module, find_unused: bool, compile_: bool) -> torch.nn.Module:
        """The module the step calls: DDP for several plain processes (FSDP is applied in place), compiled on
        request. DDP hooks only the parameters that require grad when it is built: re-wrap after unfreezing."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, find_unused_parameters=find_unused) if self.world > 1 and not self.fsdp else model
        return torch.compile(net) if compile_ else net

    def full_states(self, model: torch.nn.Module, opt=None) -> tuple[dict, dict | None]:
        """Plain (unsharded) model and optimiser state dicts, the checkpoint format for every strategy. Under FSDP
        this is a collective: every rank calls it; rank 0 receives the full tensors (on the CPU), others empty."""
        if not self.fsdp:
            return model.state_dict(), (opt.state_dict() if opt is not None else None)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=opts),
                get_optimizer_state_dict(model, opt, options=opts) if opt is not None else None)

    def load_states(self, model: torch.nn.Module, opt, model_sd: dict, opt_sd: dict) -> None:
        if not self.fsdp:
            model.load_state_dict(model_sd)
            opt.load_state_dict(opt_sd)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)  # every rank read the full file; each keeps its shard
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, opt, opt_sd, options=opts)
